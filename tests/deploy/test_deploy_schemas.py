"""Every object deploy/k8s creates, against the API schemas a cluster checks it with.

Each kustomization is rendered (rendering.py), and the manifests that no kustomization includes are read as
written. Built-in kinds are validated against the OpenAPI schemas of Kubernetes KUBERNETES_VERSION
(kubernetes-validate ships them); custom resources against the CRD schema of the release that crd_schemas/
names. Unknown fields are errors, as with `kubectl apply`, whose field validation is strict by default: a
misspelt field would otherwise be dropped without a word. The pod templates inside a LeaderWorkerSet are also
checked as the pods they become, against the same Kubernetes version.
"""

import copy
import functools
import json
import pathlib

import jsonschema
import kubernetes_validate
import pytest
import yaml

from tests.deploy.rendering import K8S, KUSTOMIZATIONS, render

# The one Kubernetes release the manifests are checked against; the dev extras' kubectl is of the same minor.
KUBERNETES_VERSION = "1.36"
CRD_SCHEMAS = pathlib.Path(__file__).parent / "crd_schemas"


def kubernetes_objects(path: pathlib.Path) -> list[dict]:
    """The documents of `path` that are Kubernetes objects (not, say, a Helm chart's values)."""
    documents = yaml.safe_load_all(path.read_text())
    return [d for d in documents if isinstance(d, dict) and {"apiVersion", "kind"} <= d.keys()]


# Manifests applied on their own (`kubectl apply -f`), outside every kustomization.
STANDALONE = sorted(p for p in K8S.rglob("*.yaml")
                    if not (p.parent / "kustomization.yaml").exists() and kubernetes_objects(p))


# ---- schemas -------------------------------------------------------------------------------------------

def rejecting_unknown_fields(schema: dict) -> dict:
    """A CRD's structural schema with unknown fields refused wherever the API server would prune them."""
    strict = dict(schema)
    if "properties" in schema:
        strict["properties"] = {name: rejecting_unknown_fields(s) for name, s in schema["properties"].items()}
        if "additionalProperties" not in schema and not schema.get("x-kubernetes-preserve-unknown-fields"):
            strict["additionalProperties"] = False
    if isinstance(schema.get("additionalProperties"), dict):
        strict["additionalProperties"] = rejecting_unknown_fields(schema["additionalProperties"])
    if "items" in schema:
        strict["items"] = rejecting_unknown_fields(schema["items"])
    for combined in ("anyOf", "allOf", "oneOf"):
        if combined in schema:
            strict[combined] = [rejecting_unknown_fields(s) for s in schema[combined]]
    return strict


@functools.cache
def crd_validators() -> dict[tuple[str, str], jsonschema.Draft4Validator]:
    """(apiVersion, kind) -> validator; CRD schemas are OpenAPI v3.0, whose keywords are JSON Schema draft 4's."""
    validators = {}
    for path in sorted(CRD_SCHEMAS.glob("*.json")):
        crd = json.loads(path.read_text())
        schema = rejecting_unknown_fields(crd["openAPIV3Schema"])
        validators[crd["apiVersion"], crd["kind"]] = jsonschema.Draft4Validator(schema)
    return validators


# ---- validation ----------------------------------------------------------------------------------------

def schema_errors(obj: dict) -> list[str]:
    """What the API server of KUBERNETES_VERSION (with the vendored CRDs installed) would refuse in `obj`."""
    name = f"{obj.get('kind')}/{obj.get('metadata', {}).get('name')}"
    validator = crd_validators().get((obj.get("apiVersion"), obj.get("kind")))
    if validator is not None:
        errors = [f"{name}: {at(e.absolute_path)}: {e.message}" for e in validator.iter_errors(obj)]
        return errors + [e for template in embedded_pod_templates(obj) for e in builtin_errors(template)]
    return builtin_errors(obj)


def builtin_errors(obj: dict) -> list[str]:
    name = f"{obj['kind']}/{obj['metadata']['name']}"
    try:
        validated = kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.SchemaNotFoundError:
        return [f"{name}: {obj['apiVersion']} {obj['kind']} is neither in Kubernetes {KUBERNETES_VERSION} "
                f"nor a CRD under {CRD_SCHEMAS.name}/"]
    except kubernetes_validate.ValidationError as error:
        return [f"{name}: {at(error.path)}: {error.message}"]
    # kubernetes-validate falls back to an older release it ships when it lacks the one asked for.
    assert validated == KUBERNETES_VERSION, f"validated against Kubernetes {validated}, not {KUBERNETES_VERSION}"
    return []


def embedded_pod_templates(obj: dict) -> list[dict]:
    """A LeaderWorkerSet's leader and worker templates as core PodTemplates, which the pods it makes must be."""
    if obj["kind"] != "LeaderWorkerSet":
        return []
    group = obj["spec"]["leaderWorkerTemplate"]
    return [{"apiVersion": "v1", "kind": "PodTemplate",
             "metadata": {"name": f"{obj['metadata']['name']}-{role}"}, "template": group[role]}
            for role in ("leaderTemplate", "workerTemplate") if role in group]


def at(path) -> str:
    return ".".join(str(part) for part in path) or "(top)"


# ---- the manifests -------------------------------------------------------------------------------------

@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS, ids=lambda p: p.relative_to(K8S).as_posix())
def test_rendered_objects_are_valid_for_the_api(kustomization):
    objects = render(kustomization)
    assert objects, "renders nothing"
    errors = [e for obj in objects for e in schema_errors(obj)]
    assert not errors, "\n".join(errors)


def test_standalone_objects_are_valid_for_the_api():
    # None today (each folder of manifests is a kustomization); one added later is checked here.
    errors = [f"{path}: {e}" for path in STANDALONE for obj in kubernetes_objects(path) for e in schema_errors(obj)]
    assert not errors, "\n".join(errors)


def test_every_vendored_crd_schema_checks_a_manifest():
    kinds = {o["kind"] for k in KUSTOMIZATIONS for o in render(k)} | {
        o["kind"] for p in STANDALONE for o in kubernetes_objects(p)}
    assert {kind for _, kind in crd_validators()} == {"LeaderWorkerSet", "PodMonitor"}
    assert {"LeaderWorkerSet", "PodMonitor"} <= kinds


# ---- what the validation refuses -----------------------------------------------------------------------

def container(obj: dict) -> dict:
    spec = obj["spec"]
    template = spec["leaderWorkerTemplate"]["leaderTemplate"] if "leaderWorkerTemplate" in spec else spec["template"]
    return template["spec"]["containers"][0]


MISTAKES = {
    "misspelt container field": ("Deployment", lambda o: container(o).update(imagePulPolicy="Always"),
                                 "'imagePulPolicy' was unexpected"),
    "replicas as words": ("Deployment", lambda o: o["spec"].update(replicas="two"), "'two' is not of type"),
    "probe without a handler port": ("Deployment", lambda o: container(o)["livenessProbe"].update(
        grpc={"service": "x"}), "'port' is a required property"),
    "unknown group restart policy": ("LeaderWorkerSet", lambda o: o["spec"]["leaderWorkerTemplate"].update(
        restartPolicy="Always"), "'Always' is not one of"),
    "misspelt group field": ("LeaderWorkerSet", lambda o: o["spec"]["leaderWorkerTemplate"].update(sise=2),
                             "'sise' was unexpected"),
    "misspelt field in the leader's pod": ("LeaderWorkerSet", lambda o: container(o).update(comand=["x"]),
                                           "'comand' was unexpected"),
    "API version long removed": ("Deployment", lambda o: o.update(apiVersion="extensions/v1beta1"),
                                 "is neither in Kubernetes"),
}


@pytest.mark.parametrize("mistake", MISTAKES)
def test_validation_refuses_what_a_cluster_refuses(mistake):
    kind, damage, expected = MISTAKES[mistake]
    obj = copy.deepcopy(next(o for o in render(K8S / "overlays" / "nvidia-241b") if o["kind"] == kind))
    assert not schema_errors(obj)
    damage(obj)
    errors = schema_errors(obj)
    assert any(expected in e for e in errors), errors


def test_validation_refuses_a_misspelt_pod_monitor_endpoint():
    (monitor,) = kubernetes_objects(K8S / "monitoring" / "podmonitor.yaml")
    monitor = copy.deepcopy(monitor)
    monitor["spec"]["podMetricsEndpoints"][0]["prot"] = "metrics"
    assert any("'prot' was unexpected" in e for e in schema_errors(monitor))
