"""Shared inputs of the benchmark smoke tests."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture
def tiny_sst2(tmp_path) -> Path:
    """A made-up SST-2 folder (train.tsv 40 rows, dev.tsv 12), label = whether the sentence says "good"."""
    data = tmp_path / "sst2"
    data.mkdir()
    for name, n in (("train.tsv", 40), ("dev.tsv", 12)):
        rows = ["sentence\tlabel"] + [f"a {'good' if i % 2 else 'dull'} film {i}\t{i % 2}" for i in range(n)]
        (data / name).write_text("\n".join(rows) + "\n")
    return data
