"""The server-timing trailer's syntax (client/gem/knowledge/timing.py): what the server
writes reads back; a trailer that is not ours never fails a call."""

from __future__ import annotations

import pytest
from gem.knowledge.timing import format_server_timing, parse_server_timing


def test_what_the_server_writes_reads_back():
    stages = {"decode": 0.4125, "model": 14.981, "encode": 0.3}
    assert parse_server_timing(format_server_timing(stages)) == pytest.approx(stages, abs=1e-3)


@pytest.mark.parametrize(
    ("trailer", "read"),
    [
        ("", {}),
        ("model;dur=2.5;desc=onnx", {"model": 2.5}),
        ('model;desc="x";dur=2.5, encode', {"model": 2.5}),
        ("model;dur=nan, decode;dur=inf, encode;dur=1e400, x;dur=-1", {}),
        ("model;dur=fast, ;dur=3, \x00;;;=, decode;dur=1", {"decode": 1.0}),
    ],
)
def test_a_foreign_trailer_reads_as_far_as_it_can(trailer, read):
    assert parse_server_timing(trailer) == read
