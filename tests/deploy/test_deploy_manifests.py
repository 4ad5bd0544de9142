"""The deployment files against the code they deploy.

Every container command in the Kubernetes manifests and the Dockerfiles is parsed by the stage's real
command-line parser, and the rendered overlays are checked for what would break a rollout without an error
message: probes on the wrong port, grace periods shorter than the stage's drain, a --vision or --llm target that
no Service answers, device counts that disagree with the parallelism, autoscalers on metrics nobody exports, TLS
files that no Secret provides, network policies that let the wrong pods in or keep the right ones out.
The overlays are rendered as rendering.py says; test_deploy_schemas.py checks the same objects against the API.
"""

import atexit
import contextlib
import functools
import inspect
import io
import json
import pathlib
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import tomllib

import pytest
import yaml
from vllm.v1.metrics import loggers as vllm_metric_loggers

from gateway.app import create_app
from gateway.config import config_from_args as gateway_config
from llm_svc.config import parse_config as llm_config
from vision_svc import metrics as vision_metrics
from tests.certs import TestPki
from tests.deploy.rendering import K8S, KUSTOMIZATIONS, ROOT, render
from vision_svc.config import parse_config as vision_config

DOCKER = ROOT / "deploy" / "docker"
ENTRYPOINT = DOCKER / "entrypoint.sh"
ADAPTER_VALUES = K8S / "monitoring" / "prometheus-adapter-values.yaml"
MANIFESTS = sorted(K8S.rglob("*.yaml"))
DOCKERFILES = sorted(DOCKER.glob("*.Dockerfile"))
STAGES = ("vision_svc", "llm_svc", "gateway")
DEVICE_RESOURCES = {"cuda": "nvidia.com/gpu", "npu": "huawei.com/Ascend910"}
# Where each stage's Secret (certificate, key, CA) is mounted; parsed here, it stands for local_tls_dir().
TLS_DIR = "/etc/internvl/tls"
MONITORING = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}
CALLERS = {"vision_svc": "llm_svc", "llm_svc": "gateway"}
# The kustomizations that run the stages; monitoring/ holds only what Prometheus and Grafana read.
STACKS = [k for k in KUSTOMIZATIONS if k != K8S / "monitoring"]


@functools.cache
def local_tls_dir() -> pathlib.Path:
    """Files of the names a stage's Secret holds (tls.crt, tls.key, ca.crt), made here, since the stages' parsers
    read the files they are given."""
    directory = pathlib.Path(tempfile.mkdtemp(prefix="manifest-tls-"))
    atexit.register(shutil.rmtree, directory, ignore_errors=True)
    TestPki(directory).issue("tls", "llm-headless")
    return directory


# ---- a stage's command line ----------------------------------------------------------------------------

def parse_stage(args: list[str]):
    """[stage, flags...] -> the stage's validated config; AssertionError with the parser's message if refused."""
    parsers = {"vision_svc": vision_config, "llm_svc": lambda argv: llm_config(argv)[0], "gateway": gateway_config}
    assert args and args[0] in parsers, f"{args[:1]} names no stage"
    args = localized(args)
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            return parsers[args[0]](args[1:])
    except SystemExit:
        raise AssertionError(f"{args[0]} refuses {shlex.join(args[1:])}:\n{stderr.getvalue()}") from None


def llm_engine_args(args: list[str]):
    """vLLM's engine arguments from an llm_svc command line that parse_stage accepts."""
    parse_stage(args)
    return llm_config(localized(args[1:]))[1]


def localized(args: list[str]) -> list[str]:
    """`args` with the files of the mounted Secret taken from local_tls_dir()."""
    if not any(TLS_DIR in a for a in args):
        return args
    return [a.replace(TLS_DIR + "/", f"{local_tls_dir()}/") for a in args]


def expand_env(container: dict) -> list[str]:
    """The container's args after Kubernetes' $(VAR) expansion from the container's own env."""
    env = {e["name"]: e.get("value", "<from-field>") for e in container.get("env", [])}

    def value(match: re.Match) -> str:
        # Kubernetes leaves an unknown $(VAR) in place, so a typo would reach the stage as a literal.
        assert match[1] in env, f"container {container['name']}: $({match[1]}) is not in its env"
        return env[match[1]]

    return [re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", value, a) for a in container["args"]]


# ---- manifests -----------------------------------------------------------------------------------------

def containers_in(node) -> list[dict]:
    """Every container under any `containers:` list, however deep (Deployments, LWS templates, patches)."""
    if isinstance(node, dict):
        own = [c for c in node.get("containers", []) if isinstance(c, dict)]
        return own + [c for key, v in node.items() if key != "containers" for c in containers_in(v)]
    if isinstance(node, list):
        return [c for item in node for c in containers_in(item)]
    return []


def stage_containers(node) -> list[dict]:
    return [c for c in containers_in(node) if c.get("args") and c["args"][0] in STAGES]


def pod_groups(objects) -> list[tuple[dict, list[tuple[dict, int]]]]:
    """(workload, [(pod template, pods of this template per replica), ...]) for Deployments and LWS."""
    groups = []
    for obj in objects:
        if obj["kind"] == "Deployment":
            groups.append((obj, [(obj["spec"]["template"], 1)]))
        elif obj["kind"] == "LeaderWorkerSet":
            lwt = obj["spec"]["leaderWorkerTemplate"]
            groups.append((obj, [(lwt["leaderTemplate"], 1), (lwt["workerTemplate"], lwt["size"] - 1)]))
    return groups


def find(objects, kind: str, name: str) -> dict:
    matches = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(matches) == 1, f"{kind}/{name}: {len(matches)} in the rendered manifests"
    return matches[0]


def stage_pods(objects, stage: str) -> list[tuple[dict, dict]]:
    """(pod template, container) of every pod that runs `stage`."""
    return [(pod, c) for _, pods in pod_groups(objects) for pod, _ in pods
            for c in stage_containers(pod) if c["args"][0] == stage]


def devices(container: dict) -> dict[str, int]:
    limits = container.get("resources", {}).get("limits", {})
    return {r: int(limits[r]) for r in DEVICE_RESOURCES.values() if r in limits}


def assert_target_served(objects, target: str, stage: str) -> None:
    """[dns:///]HOST:PORT names a Service whose port leads to the listening port of pods running `stage`."""
    host, _, port = target.removeprefix("dns:///").rpartition(":")
    service = find(objects, "Service", host.split(".")[0])
    ports = [p for p in service["spec"]["ports"] if p["port"] == int(port)]
    assert ports, f"Service {host} has no port {port}"
    selector = service["spec"]["selector"].items()
    reached = [(pod, c) for pod, c in stage_pods(objects, stage) if selector <= pod["metadata"]["labels"].items()]
    assert reached, f"Service {host} selects no pod running {stage}"
    for _, container in reached:
        target_port = ports[0]["targetPort"]
        named = {p["name"]: p["containerPort"] for p in container["ports"]}
        listening = parse_stage(expand_env(container)).port
        assert named.get(target_port, target_port) == listening, f"{target} does not reach {stage}'s --port"


# ---- every file, as written ----------------------------------------------------------------------------

@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: str(p.relative_to(K8S)))
def test_manifest_parses_and_its_stage_commands_are_accepted(path):
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert docs, f"{path} holds no YAML document"
    for container in stage_containers(docs):
        parse_stage(expand_env(container))


def test_every_overlay_kustomization_is_found():
    names = {p.relative_to(K8S).as_posix() for p in KUSTOMIZATIONS}
    assert {"base", "overlays/nvidia", "overlays/ascend", "overlays/nvidia-241b"} <= names


# ---- rendered overlays ---------------------------------------------------------------------------------

@pytest.mark.parametrize("kustomization", STACKS, ids=lambda p: p.relative_to(K8S).as_posix())
class TestRendered:
    def test_each_stage_runs_once_per_replica_with_accepted_args(self, kustomization):
        objects = render(kustomization)
        for stage in STAGES:
            pods = stage_pods(objects, stage)
            assert len(pods) == 1, f"{stage} runs in {len(pods)} pod templates"
            parse_stage(expand_env(pods[0][1]))

    def test_probes_ask_the_port_the_stage_listens_on(self, kustomization):
        for stage in STAGES:
            for _, container in stage_pods(render(kustomization), stage):
                config = parse_stage(expand_env(container))
                assert config.port in [p["containerPort"] for p in container["ports"]]
                if stage == "gateway":
                    routes = {route.path for route in create_app(config).routes}
                    for probe in ("readinessProbe", "livenessProbe"):
                        assert container[probe]["httpGet"]["port"] == config.port
                        assert container[probe]["httpGet"]["path"] in routes
                else:
                    # The kubelet cannot speak TLS: with it, probes ask the plaintext health port.
                    probe_port = config.health_port if config.tls.enabled else config.port
                    assert probe_port in [p["containerPort"] for p in container["ports"]], stage
                    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                        assert container[probe]["grpc"]["port"] == probe_port, f"{stage} {probe}"

    def test_grace_period_outlasts_the_stage_drain(self, kustomization):
        for stage in STAGES:
            for pod, container in stage_pods(render(kustomization), stage):
                config = parse_stage(expand_env(container))
                drain_s = config.shutdown_grace_s if stage == "gateway" else config.grace_s
                pre_stop = container.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command", [])
                sleep_s = float(pre_stop[1]) if pre_stop[:1] == ["sleep"] else 0.0
                # The gRPC stages spend one more second announcing NOT_SERVING before they drain.
                assert pod["spec"]["terminationGracePeriodSeconds"] > sleep_s + drain_s + 1, stage

    def test_each_stage_reads_its_tls_files_from_its_own_secret(self, kustomization):
        secrets = {}
        for stage in STAGES:
            for pod, container in stage_pods(render(kustomization), stage):
                tls = parse_stage(expand_env(container)).tls
                assert None not in (tls.cert, tls.key, tls.ca), f"{stage} runs without mutual TLS"
                volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
                for local in (tls.cert, tls.key, tls.ca):
                    path = pathlib.PurePosixPath(TLS_DIR) / local.relative_to(local_tls_dir())
                    mounts = [m for m in container["volumeMounts"] if path.is_relative_to(m["mountPath"])]
                    assert len(mounts) == 1 and mounts[0].get("readOnly"), f"{stage}: {path} is not mounted read-only"
                    secret = volumes[mounts[0]["name"]].get("secret")
                    assert secret, f"{stage}: {path} does not come from a Secret"
                    assert str(path.relative_to(mounts[0]["mountPath"])) in [i["path"] for i in secret["items"]]
                    secrets.setdefault(stage, set()).add(secret["secretName"])
        assert all(len(names) == 1 for names in secrets.values()), secrets
        assert len(set.union(*secrets.values())) == len(STAGES), f"one Secret per stage: {secrets}"

    def test_network_policies_let_only_the_caller_reach_the_grpc_port(self, kustomization):
        objects = render(kustomization)
        for stage, caller in CALLERS.items():
            for pod, container in stage_pods(objects, stage):
                config = parse_stage(expand_env(container))
                peers = ingress_peers(objects, pod, container, config.port)
                assert peers is not None, f"no NetworkPolicy selects the {stage} pods: anyone reaches them"
                assert all(set(peer) == {"podSelector"} for peer in peers), f"{stage}: {peers} reach beyond pods"
                admitted = [(workload, other) for workload, pods in pod_groups(objects) for other, _ in pods
                            if any(matches(p["podSelector"], other["metadata"]["labels"]) for p in peers)]
                assert any(c["args"][0] == caller for _, other in admitted for c in stage_containers(other)), \
                    f"{caller} cannot reach {stage}"
                own_group = next(w for w, pods in pod_groups(objects) if any(p is pod for p, _ in pods))
                for workload, other in admitted:
                    # A multi-node group's pods talk Ray among themselves on every port.
                    runs_caller = [c["args"][0] for c in stage_containers(other)] == [caller]
                    assert runs_caller or workload is own_group, \
                        f"{workload['metadata']['name']} reaches {stage}'s gRPC port"
                # Probes come from the node, which no selector names; Prometheus from the monitoring namespace.
                assert {} in ingress_peers(objects, pod, container, config.health_port), f"{stage} health port"
                metrics = ingress_peers(objects, pod, container, config.metrics_port)
                assert MONITORING in metrics and {} not in metrics, f"{stage} metrics port: {metrics}"

    def test_vision_and_llm_targets_reach_their_stage(self, kustomization):
        objects = render(kustomization)
        for _, container in stage_pods(objects, "llm_svc"):
            for target in parse_stage(expand_env(container)).vision:
                assert_target_served(objects, target, "vision_svc")
        for _, container in stage_pods(objects, "gateway"):
            for target in parse_stage(expand_env(container)).llm_targets:
                assert_target_served(objects, target, "llm_svc")

    def test_devices_match_device_flag_and_parallelism(self, kustomization):
        objects = render(kustomization)
        for _, container in stage_pods(objects, "vision_svc"):
            device = parse_stage(expand_env(container)).device.split(":")[0]
            assert (device == "cpu") == container["image"].endswith(":cpu"), "accelerator images use the device"
            expected = {} if device == "cpu" else {DEVICE_RESOURCES[device]: 1}
            assert devices(container) == expected, "vision_svc drives exactly the one device it is given"
        for _, pods in pod_groups(objects):
            llm = [c for pod, _ in pods for c in stage_containers(pod) if c["args"][0] == "llm_svc"]
            if not llm:
                continue
            engine = llm_engine_args(expand_env(llm[0]))
            group = {}
            for pod, count in pods:
                for container in containers_in(pod["spec"]):
                    for resource, n in devices(container).items():
                        group[resource] = group.get(resource, 0) + n * count
            ranks = engine.tensor_parallel_size * engine.pipeline_parallel_size * engine.data_parallel_size
            expected = 0 if llm[0]["image"].endswith(":cpu") else ranks
            assert sum(group.values()) == expected, f"devices {group} for {ranks} ranks"
            assert len(group) <= 1, "one kind of accelerator per engine"
            if sum(p for _, p in pods) > 1:
                assert engine.distributed_executor_backend == "ray", "several pods per engine need Ray"

    def test_multinode_groups_wait_for_every_node(self, kustomization):
        objects = render(kustomization)
        for workload, pods in pod_groups(objects):
            if workload["kind"] != "LeaderWorkerSet":
                continue
            (leader, _), (worker, _) = pods
            env = {e["name"]: e.get("value") for e in stage_containers(leader)[0]["env"]}
            assert env["RAY_CLUSTER_SIZE"] == str(workload["spec"]["leaderWorkerTemplate"]["size"])
            assert [c["args"] for c in containers_in(worker["spec"])] == [["ray-worker"]]
            assert leader["metadata"]["labels"] != worker["metadata"]["labels"], "workers serve no gRPC"
            # Ray and NCCL use many ports both ways: whatever the policies, the group's pods reach each other.
            for pod, other in ((leader, worker), (worker, leader)):
                for container in containers_in(pod["spec"]):
                    for port in [6379, 12345]:
                        peers = ingress_peers(objects, pod, container, port)
                        assert peers is None or any(matches(p.get("podSelector", {}), other["metadata"]["labels"])
                                                    for p in peers if set(p) <= {"podSelector"}), port

    def test_autoscalers_scale_a_workload_on_a_metric_it_exports(self, kustomization):
        objects = render(kustomization)
        for hpa in (o for o in objects if o["kind"] == "HorizontalPodAutoscaler"):
            ref = hpa["spec"]["scaleTargetRef"]
            workload = find(objects, ref["kind"], ref["name"])
            stages = {c["args"][0] for c in stage_containers(workload)}
            for metric in hpa["spec"]["metrics"]:
                if metric["type"] == "Resource":
                    name = metric["resource"]["name"]
                    assert all(name in c["resources"]["requests"] for c in containers_in(workload)), \
                        f"{hpa['metadata']['name']}: utilization of {name} needs a request"
                else:
                    assert metric["type"] == "Pods"
                    series = adapter_series().get(metric["pods"]["metric"]["name"])
                    assert series is not None, f"no adapter rule publishes {metric['pods']['metric']['name']}"
                    assert series in exported_metrics(stages), f"{stages} do not export {series}"


def matches(selector: dict, labels: dict) -> bool:
    """A Kubernetes label selector (matchLabels, matchExpressions) against a pod's labels."""
    if not selector.get("matchLabels", {}).items() <= labels.items():
        return False
    tests = {"In": lambda e: labels.get(e["key"]) in e["values"],
             "NotIn": lambda e: labels.get(e["key"]) not in e["values"],
             "Exists": lambda e: e["key"] in labels, "DoesNotExist": lambda e: e["key"] not in labels}
    return all(tests[e["operator"]](e) for e in selector.get("matchExpressions", []))


def ingress_peers(objects, pod: dict, container: dict, port: int) -> list[dict] | None:
    """The `from` peers that the NetworkPolicies selecting `pod` admit to `port` ({} for a rule open to every
    source); None when no policy selects the pod, which then takes traffic from anywhere."""
    names = {p["containerPort"]: p.get("name") for p in container.get("ports", [])}
    policies = [o for o in objects if o["kind"] == "NetworkPolicy" and "Ingress" in o["spec"]["policyTypes"]
                and matches(o["spec"]["podSelector"], pod["metadata"]["labels"])]
    if not policies:
        return None
    return [peer for policy in policies for rule in policy["spec"].get("ingress", [])
            if "ports" not in rule or any(p.get("port", port) in (port, names.get(port)) for p in rule["ports"])
            for peer in rule.get("from") or [{}]]


@functools.cache
def adapter_series() -> dict[str, str]:
    """Custom-metric name -> the Prometheus series it comes from, per the adapter's rules."""
    rules = yaml.safe_load(ADAPTER_VALUES.read_text())["rules"]["custom"]
    return {rule["name"]["as"]: re.fullmatch(r"([\w:]+)\{.*\}", rule["seriesQuery"])[1] for rule in rules}


def exported_metrics(stages: set[str]) -> set[str]:
    names = set()
    if "vision_svc" in stages:
        names |= {m._name for m in vars(vision_metrics).values() if hasattr(m, "_name") and hasattr(m, "collect")}
    if "llm_svc" in stages:
        # llm_svc serves vLLM's own metrics, which vLLM names as literals in its Prometheus logger.
        names |= set(re.findall(r'name="(vllm:\w+)"', inspect.getsource(vllm_metric_loggers)))
    return names


# ---- images --------------------------------------------------------------------------------------------

def instructions(dockerfile: pathlib.Path) -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", dockerfile.read_text())
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines]


def usage_examples(dockerfile: pathlib.Path) -> list[list[str]]:
    """What follows the image name in each `docker run ... internvl-dvd:TAG ...` line of the header."""
    tag = f"internvl-dvd:{dockerfile.stem}"
    examples = []
    for line in dockerfile.read_text().splitlines():
        if line.startswith("#") and "docker run" in line:
            words = shlex.split(line.lstrip("# "))
            assert tag in words, f"example runs another image than {tag}: {line}"
            examples.append(words[words.index(tag) + 1:])
    return examples


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
class TestDockerfile:
    def test_copies_every_package_and_only_existing_paths(self, dockerfile):
        copies = [args.split() for op, args in instructions(dockerfile) if op == "COPY"]
        sources = {src for words in copies for src in words[:-1] if not src.startswith("--")}
        assert all((ROOT / s).exists() for s in sources - {"README.md"}), sources
        packages = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
        assert {p.rstrip("*") for p in packages["include"]} <= sources
        assert "pyproject.toml" in sources

    def test_entrypoint_is_the_stage_launcher(self, dockerfile):
        ops = instructions(dockerfile)
        entrypoint = json.loads(next(args for op, args in ops if op == "ENTRYPOINT"))
        assert [["deploy/docker/entrypoint.sh", *entrypoint]] == [
            words.split() for op, words in ops if op == "COPY" and "entrypoint.sh" in words]
        assert json.loads(next(args for op, args in ops if op == "CMD"))[0] in STAGES

    def test_usage_examples_are_accepted(self, dockerfile):
        examples = usage_examples(dockerfile)
        assert {e[0] for e in examples} >= set(STAGES), "one example per stage"
        for example in examples:
            if example[0] in STAGES:
                parse_stage(example)
            else:
                assert example[:2] == ["python3", "-m"] and (ROOT / example[2].replace(".", "/")).is_dir()


def test_entrypoint_starts_the_named_stage():
    assert subprocess.run(["bash", "-n", str(ENTRYPOINT)]).returncode == 0
    env = {"PATH": f"{pathlib.Path(sys.executable).parent}:/usr/bin:/bin"}
    stage = subprocess.run(["bash", str(ENTRYPOINT), "gateway", "--help"], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=60)
    assert stage.returncode == 0 and stage.stdout.startswith("usage: python -m gateway"), stage.stderr
    bare = subprocess.run(["bash", str(ENTRYPOINT)], cwd=ROOT, env=env, capture_output=True, text=True)
    assert bare.returncode == 2 and "usage:" in bare.stderr
