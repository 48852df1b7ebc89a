"""The examples of README.md ("Run sparse models on CPU") and docs/backend.md run as written."""

from __future__ import annotations

import re
from pathlib import Path

import torch
from transformers import BertForSequenceClassification

from hf_sparse import SparseCheckpoint
from hf_sparse.nn import SparseLinear
from tests.integrations.backend_support import assert_close, dense_reference
from tests.integrations.test_backend_encoder_layer import reference_for


ROOT = Path(__file__).resolve().parents[2]


def _run(text: str, where: str, cwd: Path, monkeypatch) -> dict:
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert len(blocks) == 1, f"{where}: expected one python example"
    monkeypatch.chdir(cwd)
    namespace: dict = {}
    exec(compile(blocks[0], where, "exec"), namespace)
    return namespace


def test_readme_section_runs(tmp_path, monkeypatch):
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Run sparse models on CPU", 1)[1].split("\n## ", 1)[0]
    ns = _run(section, "README.md", tmp_path, monkeypatch)
    sparse = ns["sparse"]
    assert isinstance(sparse.bert.encoder.layer[0].attention.self.query, SparseLinear)
    reference = reference_for(sparse, tmp_path / "bert-sparse", BertForSequenceClassification)
    with torch.no_grad():
        expected = reference(input_ids=torch.tensor([[101, 2023, 3185, 2001, 2307, 102]])).logits
    assert_close(ns["logits"], expected, 1e-5)


def test_backend_doc_example_runs(tmp_path, monkeypatch):
    ns = _run((ROOT / "docs" / "backend.md").read_text(), "docs/backend.md", tmp_path, monkeypatch)
    SparseCheckpoint(tmp_path / "tiny-bert-sparse-again").validate()
    reference = dense_reference(tmp_path / "tiny-bert-sparse", BertForSequenceClassification)
    for key, value in ns["dense"].state_dict().items():
        assert torch.equal(value, reference.state_dict()[key]), key
    assert ns["logits"].shape == (1, 2)
