"""The Grafana dashboard (deploy/k8s/monitoring/dashboards/) against the stack it watches: every metric a panel or
a variable queries is exported by the real stages once they have served an image chat and a text completion, so
no panel stays empty because a metric was renamed. Also that the file is a dashboard Grafana loads, and that the
monitoring kustomization ships it to Grafana's sidecar."""

import base64
import io
import json
import re

import httpx
import pytest
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from tests.deploy.rendering import K8S, render
from tests.gateway.conftest import MODEL

DASHBOARD = K8S / "monitoring" / "dashboards" / "internvl-dvd.json"
# Grafana's own variables, which a dashboard uses without defining them.
GRAFANA_VARIABLES = {"__rate_interval", "__interval", "__range"}
PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless",
                "offset", "inf", "nan"}


def metric_names(expr: str) -> set[str]:
    """The series names a PromQL expression selects: what is left once strings, label matchers, ranges, grouping
    clauses, numbers, functions and keywords are taken out."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    expr = re.sub(r"\{[^}]*\}", " ", expr)
    expr = re.sub(r"\[[^\]]*\]", " ", expr)
    expr = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", expr)
    expr = re.sub(r"(?<![\w:])\d[\w.]*", " ", expr)  # numbers and durations (0.99, 1e-9, 5m)
    words = re.finditer(r"([A-Za-z_:][\w:]*)\s*(\()?", expr)
    return {w[1] for w in words if not w[2] and w[1].lower() not in PROMQL_WORDS}


def variable_metric_names(query: str) -> set[str]:
    """The names a `label_values(SELECTOR, LABEL)` variable reads, SELECTOR being a name or {__name__=~"a|b"}."""
    selector = re.fullmatch(r"label_values\((.*),\s*\w+\)", query.strip())[1]
    by_name = re.fullmatch(r'\{__name__=~"([\w:|]+)"\}', selector.strip())
    return set(by_name[1].split("|")) if by_name else metric_names(selector)


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def panels(board: dict) -> list[dict]:
    """Every panel, those inside collapsed rows included."""
    return [p for top in board["panels"] for p in [top, *top.get("panels", [])]]


def queried_names(board: dict) -> dict[str, str]:
    """Metric name -> the title of one panel (or variable) that queries it."""
    names = {}
    for panel in panels(board):
        for target in panel.get("targets", []):
            names.update(dict.fromkeys(metric_names(target["expr"]), panel["title"]))
    for variable in board["templating"]["list"]:
        if variable["type"] == "query":
            names.update(dict.fromkeys(variable_metric_names(variable["query"]["query"]), f"${variable['name']}"))
    return names


@pytest.mark.parametrize("expr, names", [
    ('sum by (instance) (rate(gateway_requests_total{instance=~"$instance", status!~"2.."}[$__rate_interval]))',
     {"gateway_requests_total"}),
    ('histogram_quantile(0.99, sum by (le, instance) (rate(vllm:time_to_first_token_seconds_bucket[5m])))',
     {"vllm:time_to_first_token_seconds_bucket"}),
    ("sum(rate(a_sum[1m])) / sum(rate(a_count[1m])) > bool 1e-9", {"a_sum", "a_count"}),
    ("max(vision_queue_tiles) by (pod) + on (pod) group_left llm_svc_held_bytes offset 5m",
     {"vision_queue_tiles", "llm_svc_held_bytes"}),
    ('up{job="by (x)"}', {"up"}),
])
def test_metric_names_finds_the_series_an_expression_selects(expr, names):
    assert metric_names(expr) == names


def test_dashboard_is_one_grafana_loads():
    board = dashboard()
    assert board["uid"] and len(board["uid"]) <= 40 and board["title"]
    ids = [p["id"] for p in panels(board)]
    assert len(ids) == len(set(ids)), "duplicate panel ids"
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    for panel in panels(board):
        assert {"h", "w", "x", "y"} <= panel["gridPos"].keys() and panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        ref_ids = [t["refId"] for t in panel["targets"]]
        assert ref_ids and len(ref_ids) == len(set(ref_ids)), panel["title"]
        for target in panel["targets"]:
            used = set(re.findall(r"\$\{?(\w+)", target["expr"]))
            undefined = used - variables.keys() - GRAFANA_VARIABLES
            assert not undefined, f"{panel['title']}: undefined {undefined}"
            assert "$instance" in target["expr"], f"{panel['title']}: not filtered by replica"


def test_monitoring_kustomization_ships_the_dashboard_to_grafana():
    (config_map,) = [o for o in render(K8S / "monitoring") if o["kind"] == "ConfigMap"]
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(config_map["data"][DASHBOARD.name]) == dashboard()


def data_url(picture: Image.Image) -> str:
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def exported_samples(url: str) -> set[str]:
    """The sample names a stage serves (`x_total`, `x_bucket`, `x_sum`, ..., as PromQL sees them)."""
    text = httpx.get(url, timeout=10).raise_for_status().text
    return {sample.name for family in text_string_to_metric_families(text) for sample in family.samples}


def test_every_metric_the_dashboard_queries_is_exported_by_the_stack(stack, client):
    picture = Image.new("RGB", (600, 400), (30, 120, 200))
    chat = client.chat.completions.create(model=MODEL, max_tokens=4, temperature=0, stream=True, messages=[
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(picture)}},
                                     {"type": "text", "text": "Describe the image."}]}])
    assert "".join(c.choices[0].delta.content or "" for c in chat if c.choices)
    assert client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=4).choices[0].text

    exported = (exported_samples(f"http://{stack['gateway'].address}/metrics")
                | exported_samples(f"http://127.0.0.1:{stack['llm_metrics']}/metrics")
                | exported_samples(f"http://127.0.0.1:{stack['vision_metrics']}/metrics"))
    missing = {name: where for name, where in queried_names(dashboard()).items() if name not in exported}
    assert not missing, f"queried but exported by no stage: {missing}"
