"""glibc malloc settings for the stages' long-running processes, which allocate buffers of many sizes (request
bodies, images, tensors) from many threads.

By default glibc gives each thread that contends an arena of its own (up to 8 per core), and raises its mmap
threshold each time a large block is freed, after which blocks of that size come from the arenas and stay there.
Resident memory then creeps up for as long as the process lives (the soak bench saw vision_svc grow by 8% in
10 minutes). Two arenas and a fixed threshold keep it flat (`bench/RESULTS.md`, soak): 128 KiB by default (large
blocks mapped and unmapped as they come and go), which a stage that allocates large tensors layer after layer
raises (vision_svc: 4 MiB; its CPU encoder ran 1.16x as long with every activation mapped and zero-filled anew).
"""

import ctypes
import logging
import os

log = logging.getLogger(__name__)

# mallopt parameters (malloc.h) and their environment variables, which an operator may set to override ours.
M_MMAP_THRESHOLD, M_ARENA_MAX = -3, -8
ARENA_MAX = 2
MMAP_THRESHOLD = 128 << 10


def limit_fragmentation(environ=os.environ, mmap_threshold: int = MMAP_THRESHOLD) -> None:
    """Applies the settings to this process (call it first thing) and, through the environment, to the processes
    it starts; a setting already in the environment is left as it is. No-op without glibc."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except AttributeError:  # another C library
        return
    settings = {"MALLOC_ARENA_MAX": (M_ARENA_MAX, ARENA_MAX),
                "MALLOC_MMAP_THRESHOLD_": (M_MMAP_THRESHOLD, mmap_threshold)}
    for variable, (parameter, value) in settings.items():
        if variable in environ:
            continue
        if mallopt(parameter, value) != 1:
            log.warning("mallopt(%d, %d) failed", parameter, value)
            continue
        environ[variable] = str(value)
