"""Every fusion rule names a class of the installed transformers whose code does what the rule assumes."""

from __future__ import annotations

import importlib
import inspect
import re

import pytest

from hf_sparse.integrations.fusion_rules import RULES, FFNFusion, GeluFusion, Siblings


def _class(key: str) -> type:
    module, _, name = key.rpartition(".")
    return getattr(importlib.import_module(module), name)


def _lines(fn) -> list[str]:
    """The statements of a function's body, stripped, without the def line, docstring or comments."""
    body = inspect.getsource(fn).split(":\n", 1)[1]
    lines = [line.strip() for line in body.splitlines()]
    return [line for line in lines if line and not line.startswith(("#", '"""'))]


CASES = [(key, rule) for key, rules in RULES.items() for rule in rules]


@pytest.mark.parametrize(("key", "rule"), CASES, ids=[f"{k.rpartition('.')[2]}-{type(r).__name__}" for k, r in CASES])
def test_rule_matches_the_class(key, rule):
    cls = _class(key)  # raises if transformers renamed or moved it
    if isinstance(rule, Siblings):
        source = inspect.getsource(cls.forward)
        args = {re.search(rf"self\.{m}\((\w+)\)", source).group(1) for m in rule.members}
        assert len(args) == 1, f"{key}: siblings {rule.members} are called on different inputs {args}"
    elif isinstance(rule, GeluFusion):
        lines = _lines(cls.ff_chunk if hasattr(cls, "ff_chunk") else cls.forward)
        i = next(i for i, line in enumerate(lines) if f"self.{rule.linear}(" in line)
        out = lines[i].split(" = ")[0]
        assert lines[i + 1] == f"{out} = self.{rule.act}({out})", f"{key}: {rule.act} does not directly follow"
    else:
        assert isinstance(rule, FFNFusion)
        lines = _lines(getattr(cls, rule.method))
        if rule.method == "feed_forward_chunk":  # BertLayer and its copies
            assert lines == [
                "intermediate_output = self.intermediate(attention_output)",
                "layer_output = self.output(intermediate_output, attention_output)",
                "return layer_output",
            ]
            output_cls = _class(key.removesuffix("Layer") + "Output")
            assert _lines(output_cls.forward) == [  # what _bert_output_tail repeats after the dense
                "hidden_states = self.dense(hidden_states)",
                "hidden_states = self.dropout(hidden_states)",
                "hidden_states = self.LayerNorm(hidden_states + input_tensor)",
                "return hidden_states",
            ]
        else:  # DistilBERT's FFN.ff_chunk
            assert lines == [
                "x = self.lin1(input)",
                "x = self.activation(x)",
                "x = self.lin2(x)",
                "x = self.dropout(x)",
                "return x",
            ]
