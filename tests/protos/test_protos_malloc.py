"""The stages' malloc settings: applied, passed on to child processes, and never over an operator's own."""

from protos import malloc


def test_settings_are_applied_and_passed_on_through_the_environment():
    environ = {}
    malloc.limit_fragmentation(environ)  # mallopt accepted both (glibc): else the variables would be missing
    assert environ == {"MALLOC_ARENA_MAX": "2", "MALLOC_MMAP_THRESHOLD_": str(128 << 10)}


def test_an_operators_setting_wins():
    environ = {"MALLOC_ARENA_MAX": "8"}
    malloc.limit_fragmentation(environ)
    assert environ == {"MALLOC_ARENA_MAX": "8", "MALLOC_MMAP_THRESHOLD_": str(128 << 10)}


def test_a_stage_may_raise_the_mmap_threshold():
    environ = {}
    malloc.limit_fragmentation(environ, mmap_threshold=4 << 20)  # vision_svc: its encoder's activations
    assert environ == {"MALLOC_ARENA_MAX": "2", "MALLOC_MMAP_THRESHOLD_": str(4 << 20)}
    malloc.limit_fragmentation({}, mmap_threshold=malloc.MMAP_THRESHOLD)  # this process back as the others left it
