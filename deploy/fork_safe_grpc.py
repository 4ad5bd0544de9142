"""Import this first in a program that starts stages after it has made gRPC calls of its own (health checks):
the launcher (`deploy.local`), the benches, the tests.

`deploy.local.Stage` starts a stage with fork and exec (it sets the child's parent-death signal in between),
and once this process has used gRPC, gRPC's fork handlers can deadlock that fork, with the GIL held: the bench
freezes (grpc/grpc#37259; most runs of 200 health checks and forks froze). gRPC reads
GRPC_ENABLE_FORK_SUPPORT once, when it is imported, so it is turned off for this import alone: the stages
started later get the environment they would have had anyway. Too late when grpc is already imported.
"""

import os

_KEY = "GRPC_ENABLE_FORK_SUPPORT"
_previous = os.environ.get(_KEY)
os.environ[_KEY] = "false"
import grpc  # noqa: E402,F401  (the import that reads the setting)

if _previous is None:
    del os.environ[_KEY]
else:
    os.environ[_KEY] = _previous
