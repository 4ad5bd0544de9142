"""bench.gateway_cost: its arithmetic, and a short run of the real gateway against the floor."""

import subprocess
import sys

import pytest

from bench.gateway_cost import FLOOR, GATEWAY, fit, tables


def test_the_fit_splits_cost_into_per_request_and_per_token():
    per_request_ms, per_token_us = fit((1, 1.05), (101, 3.05))  # 1 ms a request, 20 us a token
    assert per_request_ms == pytest.approx(1.03) and per_token_us == pytest.approx(20)


def test_tables_give_each_round_the_means_their_ratio_and_the_fit():
    text = tables({1: {GATEWAY: [1.0, 1.2], FLOOR: [0.5, 0.6]}, 11: {GATEWAY: [1.3, 1.5], FLOOR: [0.6, 0.7]}})
    assert "| 1 | gateway | 1.1 | 1.000, 1.200 |" in text
    assert "| 1 | **gateway / floor** | 2.00x |" in text
    # Per request 1.1 - 0.03 = 1.07 ms against 0.55 - 0.01; per token 30 us against 10.
    assert "| gateway | 1.07 | 30 |" in text and "| **gateway / floor** | 1.98x | 3.00x |" in text


def test_a_short_run_measures_the_gateway_and_the_floor(tmp_path):
    run = subprocess.run([sys.executable, "-m", "bench.gateway_cost", "--tokens", "1", "3", "--requests", "8",
                          "--concurrency", "4", "--rounds", "2", "--logs", str(tmp_path)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("| **gateway / floor** |") == 3  # two lengths, and the fit
    assert "| 3 | bare Starlette stream |" in run.stdout


def test_arguments_that_cannot_give_a_figure_are_refused():
    run = subprocess.run([sys.executable, "-m", "bench.gateway_cost", "--requests", "2", "--concurrency", "4"],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and "--requests at least --concurrency" in run.stderr
