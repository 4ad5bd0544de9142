"""A stage's start-up heap is frozen out of garbage collection; what comes later is still collected."""

import json
import os
import subprocess
import sys

# In a process of its own: freezing this one would keep the test session's later garbage (engines) alive.
SCRIPT = """
import gc, json, logging, weakref
from protos.heap import freeze_startup_heap

logging.basicConfig(level=logging.INFO)
class Node:
    pass
frozen = freeze_startup_heap()
later = Node()
later.itself = later  # a cycle, which only the collector frees
alive = weakref.ref(later)
del later
gc.collect()
print(json.dumps({"objects": frozen.objects, "freeze_count": gc.get_freeze_count(), "later_freed": alive() is None}))
"""


def test_the_startup_heap_is_frozen_and_later_garbage_is_still_collected():
    result = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=60,
                            env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["objects"] > 1000 and report["freeze_count"] == report["objects"]  # the interpreter's own at least
    assert report["later_freed"]
    assert f"start-up heap frozen: {report['objects']} objects" in result.stderr
