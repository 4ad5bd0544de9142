"""bench.grpc_messages: both transports carry the stream to its end, and each case gets a row of figures."""

from bench.grpc_messages import run_rounds


def test_each_transport_and_in_flight_count_gets_a_row():
    rows = run_rounds(messages=50, in_flights=[1, 4], rounds=2, payload_bytes=100)
    assert [(row[0], row[1]) for row in rows] == [("TCP, loopback", 1), ("Unix socket", 1),
                                                  ("TCP, loopback", 4), ("Unix socket", 4)]
    for _, _, server, client, both, wall in rows:
        assert float(server) >= 0 and float(client) >= 0 and float(both) >= max(float(server), float(client))
        assert float(wall) > 0
