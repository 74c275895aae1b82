"""Rank 0 owns the console; other ranks' lines carry their rank."""

from __future__ import annotations

import io

from orchestrator.train.worker import _LinePrefixer


def test_every_line_of_another_rank_starts_with_its_rank() -> None:
    sink = io.StringIO()
    stream = _LinePrefixer(sink, "[rank1] ")
    stream.write("first line\nsecond ")
    stream.write("line continues\n")
    stream.write("third\n")
    assert sink.getvalue() == "[rank1] first line\n[rank1] second line continues\n[rank1] third\n"
