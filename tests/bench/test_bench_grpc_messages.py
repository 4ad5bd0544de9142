"""bench.grpc_messages: both transports carry the stream to its end, and each case gets a row of figures."""

import pytest

from bench.grpc_messages import TIMER_ALONE, measure_push, run_push_rounds, run_rounds


def test_each_transport_and_in_flight_count_gets_a_row():
    rows = run_rounds(messages=50, in_flights=[1, 4], rounds=2, payload_bytes=100)
    assert [(row[0], row[1]) for row in rows] == [("TCP, loopback", 1), ("Unix socket", 1),
                                                  ("TCP, loopback", 4), ("Unix socket", 4)]
    for _, _, server, client, both, wall in rows:
        assert float(server) >= 0 and float(client) >= 0 and float(both) >= max(float(server), float(client))
        assert float(wall) > 0


@pytest.mark.parametrize("transport", ["gRPC stream", "plain socket"])
def test_a_push_delivers_every_message(transport):
    figures = measure_push(transport, messages=40, payload_bytes=100, every_ms=1)  # fails unless all 40 arrive
    assert set(figures) == {"server", "client"} and min(figures.values()) >= 0  # CPU time counts in clock ticks


def test_the_push_gets_a_row_per_transport_and_one_for_the_timer_alone():
    rows = run_push_rounds(messages=20, payload_bytes=100, every_ms=1, rounds=2)
    assert [row[0] for row in rows] == ["gRPC stream", "plain socket", TIMER_ALONE]
    timer = float(rows[2][1])
    assert rows[2][2:] == ["-", f"{timer:.0f}", "-"]
    for _, server, client, both, hop in rows[:2]:
        assert float(both) == pytest.approx(float(server) + float(client), abs=1)
        assert float(hop) == pytest.approx(float(both) - timer, abs=1)
