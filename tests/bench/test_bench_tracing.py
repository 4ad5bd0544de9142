"""bench.tracing_overhead's own arithmetic; its figures are in bench/RESULTS.md."""

from bench.tracing_overhead import helper_cost_ns, print_results


def test_the_table_compares_on_with_off(capsys):
    times = {"off": [(0.1, 1.0), (0.3, 2.0)], "on": [(0.2, 1.5), (0.2, 2.5)]}
    print_results(times, traced_spans=33, traced_requests=2)
    out = capsys.readouterr().out
    assert "| tracing off | 2 | 200 | 280 | 1500 | 1900 |" in out
    assert "| on / off |  | 1.00x | 0.71x | 1.33x | 1.26x |" in out
    assert "33 (16.5 per request" in out


def test_helpers_are_timed_with_tracing_off():
    assert [label for label, _ in helper_cost_ns(calls=100)] == [
        "tracing.span(name) entered and left", "tracing.outgoing_metadata()",
        "tracing.current_span().is_recording()"]
