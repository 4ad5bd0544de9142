"""bench.gateway_cost and bench.llm_svc_cost: their arithmetic, and a short run of each front against its floor."""

import pathlib
import shutil
import subprocess
import sys

import pytest

from bench.cost_in_turns import fit, tables


def test_the_fit_splits_cost_into_per_request_and_per_token():
    per_request_ms, per_token_us = fit((1, 1.05), (101, 3.05))  # 1 ms a request, 20 us a token
    assert per_request_ms == pytest.approx(1.03) and per_token_us == pytest.approx(20)


def test_tables_give_each_round_the_means_their_ratio_and_the_fit():
    text = tables({1: {"gateway": [1.0, 1.2], "floor": [0.5, 0.6]}, 11: {"gateway": [1.3, 1.5], "floor": [0.6, 0.7]}},
                  "floor")
    assert "| 1 | gateway | 1.1 | 1.000, 1.200 |" in text
    assert "| 1 | **gateway / floor** | 2.00x |" in text
    # Per request 1.1 - 0.03 = 1.07 ms against 0.55 - 0.01; per token 30 us against 10.
    assert "| gateway | 1.07 | 30 |" in text and "| **gateway / floor** | 1.98x | 3.00x |" in text


def test_another_checkout_is_set_against_the_first_server_round_by_round():
    text = tables({1: {"new": [1.0, 2.0], "old": [1.25, 1.6], "floor": [0.5, 0.5]},
                   3: {"new": [2.0, 3.0], "old": [2.0, 2.0], "floor": [1.0, 1.0]}}, "floor")
    assert "| 1 | **new / floor** | 3.00x | 2.00x, 4.00x |" in text
    assert "| 1 | **old / floor** | 2.85x | 2.50x, 3.20x |" in text
    assert "| 1 | **new / old** | 1.05x | 0.80x, 1.25x |" in text and "**old / new**" not in text
    # The fit: new 1 ms a request and 500 us a token, old 1.1375 and 287.5.
    assert "| **new / old** | 0.88x | 1.74x |" in text


@pytest.mark.parametrize("module", ["gateway_cost", "llm_svc_cost"])
def test_arguments_that_cannot_give_a_figure_are_refused(module):
    run = subprocess.run([sys.executable, "-m", f"bench.{module}", "--requests", "2", "--concurrency", "4"],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and "--requests at least --concurrency" in run.stderr


@pytest.fixture
def other_checkout(tmp_path) -> pathlib.Path:
    other = tmp_path / "other"
    subprocess.run(["git", "clone", "-q", "--local", ".", str(other)], check=True)
    for built in pathlib.Path("protos").glob("*_pb2*.py"):  # as built here
        shutil.copy(built, other / "protos")
    return other


@pytest.mark.parametrize(("module", "server", "floor"), [("llm_svc_cost", "llm_svc", "bare GenerateStream"),
                                                         ("gateway_cost", "gateway", "bare Starlette stream")])
def test_a_front_is_measured_with_another_checkout_s_against_its_floor(tmp_path, other_checkout, module, server,
                                                                       floor):
    # Each call is checked to bring all its tokens, from the real servicer and service (or gateway).
    run = subprocess.run([sys.executable, "-m", f"bench.{module}", "--tokens", "1", "3", "--requests", "8",
                          "--concurrency", "4", "--rounds", "2", "--logs", str(tmp_path), "--compare-with",
                          str(other_checkout)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert run.stdout.count(f"| **{server} / floor** |") == 3  # two lengths, and the fit
    assert run.stdout.count(f"| **{server} at {commit} / floor** |") == 3
    assert run.stdout.count(f"| **{server} / {server} at {commit}** |") == 3
    assert f"| 3 | {floor} |" in run.stdout


@pytest.mark.parametrize("module", ["gateway_cost", "llm_svc_cost"])
def test_a_checkout_without_the_bench_or_its_protos_is_refused(tmp_path, module):
    run = subprocess.run([sys.executable, "-m", f"bench.{module}", "--compare-with", str(tmp_path)],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 1 and f"bench/{module}.py or protos/llm_pb2.py" in run.stderr
