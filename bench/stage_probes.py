"""What the benches read off a running stage from outside: the resident memory of its process tree (from /proc)
and its Prometheus metrics."""

import os
import pathlib

import httpx
from prometheus_client.parser import text_string_to_metric_families

from protos import lifetime

PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")


def resident_bytes(pid: int) -> int:
    """Resident memory of one process (0 when it is gone)."""
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * PAGE_BYTES
    except (OSError, IndexError, ValueError):
        return 0


def process_label(pid: int) -> str:
    """What a process is: its module for `python -m X`, else its name (vLLM names its own: VLLM::EngineCore)."""
    try:
        argv = pathlib.Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
        name = pathlib.Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return "(ended)"
    # vLLM names its processes (VLLM::EngineCore); comm keeps 15 characters of it, a retitled argv[0] all of it.
    if name.startswith("VLLM::"):
        return argv[0].strip() if argv[0].startswith("VLLM::") else name
    if "-m" in argv[:-1]:
        return argv[argv.index("-m") + 1]
    if "-c" in argv[:-1]:
        code = argv[argv.index("-c") + 1]
        return "multiprocessing resource tracker" if "resource_tracker" in code else \
            "multiprocessing worker" if "multiprocessing" in code else "python -c"
    return name


def tree_resident(pid: int) -> tuple[dict[str, int], int]:
    """(resident bytes of `pid` and of every process below it by `process_label`, processes of one label summed;
    how many processes). A stage's helpers (llm_svc's engine core, vision_svc's preprocessing workers, the orphan
    guard) count with it; pages that a parent and a forked child share are counted in each."""
    sizes: dict[str, int] = {}
    count = 0
    for p in (pid, *lifetime.descendants(pid)):
        if size := resident_bytes(p):
            label = process_label(p)
            sizes[label] = sizes.get(label, 0) + size
            count += 1
    return sizes, count


def scrape(address: str, timeout_s: float = 5.0) -> dict[str, float]:
    """Every sample of the metrics served at `address` (HOST:PORT), keyed by name and labels as Prometheus
    writes them: `vision_requests_total{code="OK"}`."""
    text = httpx.get(f"http://{address}/metrics", timeout=timeout_s).text
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            samples[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return samples


def scrape_or_empty(address: str) -> dict[str, float]:
    """`scrape`, or {} while the stage is not up."""
    try:
        return scrape(address, timeout_s=2.0)
    except (httpx.HTTPError, ValueError):
        return {}
