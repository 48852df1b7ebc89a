"""The usage example in docs/format.md runs as written."""

from __future__ import annotations

import re
from pathlib import Path

import torch

from tests.export.conftest import int8_reference


DOC = Path(__file__).resolve().parents[2] / "docs" / "format.md"


def test_format_doc_example_runs(tmp_path, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), re.S)
    assert len(blocks) == 1
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(blocks[0], str(DOC), "exec"), namespace)
    assert (tmp_path / "tiny-bert-sparse" / "model.safetensors").is_file()
    model, dense = namespace["model"], namespace["dense"]
    assert namespace["checkpoint"].quantization.pattern == "4-block"
    expected = int8_reference(model, namespace["checkpoint"].quantization.modules)
    ids = torch.tensor([[101, 7, 8, 9, 102]])
    with torch.no_grad():
        assert torch.equal(dense.eval()(input_ids=ids).logits, expected(input_ids=ids).logits)
