"""bench.fuzz's gRPC strategies set every field of the requests they make, so that a field added to a proto is
fuzzed from the start (tool fields that no strategy set once failed INTERNAL, found only by a long HTTP run)."""

import pytest
from hypothesis import given

from bench import fuzz
from protos import llm_pb2, vision_pb2


def every_field(descriptor, seen_types: frozenset = frozenset()) -> set[str]:
    """The full names of a message's fields and of the fields of the messages inside it."""
    names = set()
    for field in descriptor.fields:
        names.add(field.full_name)
        inner = field.message_type
        if inner is not None and inner.full_name not in seen_types:
            names |= every_field(inner, seen_types | {descriptor.full_name})
    return names


def fields_set(message) -> set[str]:
    names = set()
    for field, value in message.ListFields():
        names.add(field.full_name)
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            names |= {entry_field.full_name for entry_field in field.message_type.fields}
        elif field.message_type is not None:
            for item in value if field.is_repeated else [value]:
                names |= fields_set(item)
    return names


@pytest.mark.parametrize("strategy, message_type", [
    (fuzz.generate_request_pb(), llm_pb2.GenerateRequest),
    (fuzz.encode_request_pb(), vision_pb2.EncodeRequest),
], ids=["GenerateRequest", "EncodeRequest"])
def test_the_grpc_strategies_set_every_field_of_their_requests(strategy, message_type):
    seen = set()

    @fuzz.bounded_run(max_examples=1000)
    @given(request=strategy)
    def draw(request):
        seen.update(fields_set(request))

    draw()
    assert sorted(every_field(message_type.DESCRIPTOR) - seen) == []
