"""WorkLimit: requests and bytes in flight, and the room a request's first bytes leave for what it holds next."""

import pytest

from protos.errors import Overloaded
from protos.work_limits import WorkLimit


def test_bytes_past_the_limit_are_refused_and_nothing_more_is_held():
    limit = WorkLimit("stage", max_requests=4, max_bytes=10)
    work = limit.admit(holding=6)
    with pytest.raises(Overloaded, match="6 bytes of requests in flight; 5 more would pass its limit of 10"):
        work.hold(5)
    assert limit.bytes == 6 and work.bytes == 6
    work.release()
    assert limit.bytes == 0 and limit.requests == 0


def test_bodies_leave_room_so_the_first_request_to_hold_its_images_finds_it():
    # Three requests, each with a body of 3 and an image of up to 4, against a limit of 10. Were the bodies held
    # without room to spare, three would fit, and none of them its image.
    limit = WorkLimit("gateway", max_requests=8, max_bytes=10)
    first, second, third = (limit.admit() for _ in range(3))
    first.hold(3, leaving=4)
    second.hold(3, leaving=4)
    with pytest.raises(Overloaded, match="3 more and room for 4 more it may need would pass its limit of 10"):
        third.hold(3, leaving=4)
    first.hold(4)
    assert limit.bytes == 10
    with pytest.raises(Overloaded):
        second.hold(4)
    first.release()
    second.hold(4)
    assert limit.bytes == 7
