"""glibc malloc settings for the stages' long-running processes, which allocate buffers of many sizes (request
bodies, images, tensors) from many threads.

By default glibc gives each thread that contends an arena of its own (up to 8 per core), and raises its mmap
threshold each time a large block is freed, after which blocks of that size come from the arenas and stay there.
Resident memory then creeps up for as long as the process lives (the soak bench saw vision_svc grow by 8% in
10 minutes). Two arenas and a fixed 128 KiB threshold (large blocks mapped and unmapped as they come and go)
keep it flat, for no cost measured (`bench/RESULTS.md`, soak).
"""

import ctypes
import logging
import os

log = logging.getLogger(__name__)

# mallopt parameters (malloc.h) and their environment variables, which an operator may set to override ours.
M_MMAP_THRESHOLD, M_ARENA_MAX = -3, -8
SETTINGS = {"MALLOC_ARENA_MAX": (M_ARENA_MAX, 2), "MALLOC_MMAP_THRESHOLD_": (M_MMAP_THRESHOLD, 128 << 10)}


def limit_fragmentation(environ=os.environ) -> None:
    """Applies the settings to this process (call it first thing) and, through the environment, to the processes
    it starts; a setting already in the environment is left as it is. No-op without glibc."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except AttributeError:  # another C library
        return
    for variable, (parameter, value) in SETTINGS.items():
        if variable in environ:
            continue
        if mallopt(parameter, value) != 1:
            log.warning("mallopt(%d, %d) failed", parameter, value)
            continue
        environ[variable] = str(value)
