"""A hosts file of the bench's own for the processes it starts, so that one name can resolve to the addresses of
several replicas, as a headless Service's name does in Kubernetes, without touching this machine's /etc/hosts.

    python -m bench.private_hosts exec HOSTS_FILE -- MODULE ARGS...

runs `python -m MODULE ARGS...` in a mount namespace of its own where HOSTS_FILE is mounted over /etc/hosts
(the process becomes it, so its pid is the stage's). The bench then edits HOSTS_FILE in place (`write`) to add
or remove replicas: the resolver reads /etc/hosts at each lookup. Needs root (or CAP_SYS_ADMIN).
"""

import ctypes
import os
import pathlib
import sys

_CLONE_NEWNS = 0x00020000
_MS_BIND, _MS_REC, _MS_PRIVATE = 0x1000, 0x4000, 1 << 18


def write(path: pathlib.Path, names: dict[str, list[str]]) -> None:
    """Rewrites the file in place (same inode: the mounts over /etc/hosts see the change) with `names`' addresses
    and localhost."""
    lines = ["127.0.0.1 localhost", "::1 localhost"]
    lines += [f"{address} {name}" for name, addresses in names.items() for address in addresses]
    with open(path, "r+" if path.exists() else "w") as f:
        f.truncate(0)
        f.write("\n".join(lines) + "\n")


def unavailable_reason() -> str | None:
    if os.geteuid() != 0:
        return "not root: a private /etc/hosts needs a mount namespace"
    return None


def exec_with_hosts(hosts: str, argv: list[str]) -> None:
    libc = ctypes.CDLL(None, use_errno=True)

    def check(result: int, what: str) -> None:
        if result != 0:
            raise OSError(ctypes.get_errno(), what)

    check(libc.unshare(_CLONE_NEWNS), "unshare(CLONE_NEWNS)")
    # Mounts made here must not propagate back to the machine's own namespace.
    check(libc.mount(None, b"/", None, _MS_REC | _MS_PRIVATE, None), "making / private")
    check(libc.mount(os.fsencode(os.path.abspath(hosts)), b"/etc/hosts", None, _MS_BIND, None),
          f"bind-mounting {hosts} over /etc/hosts")
    os.execv(sys.executable, [sys.executable, "-m", *argv])


def main() -> None:
    if len(sys.argv) < 5 or sys.argv[1] != "exec" or sys.argv[3] != "--":
        sys.exit(__doc__)
    exec_with_hosts(sys.argv[2], sys.argv[4:])


if __name__ == "__main__":
    main()
