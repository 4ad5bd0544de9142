"""The committed stubs are exactly what grpcio-tools generates from the committed .proto files."""

import pathlib

from protos.generate import PACKAGE_DIR, generate


def test_committed_stubs_match_generated(tmp_path: pathlib.Path):
    generated = generate(tmp_path)
    assert len(generated) == 4
    for path in generated:
        committed = PACKAGE_DIR / path.name
        assert committed.read_text() == path.read_text(), f"{committed.name} is stale: run `make protos`"
