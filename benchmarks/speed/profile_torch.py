"""Where the time of a torch model's forward goes: Linear layers vs attention vs everything else.

Forward pre/post hooks time every categorized module; each category gets the module's *exclusive* time (its time
minus that of the categorized modules nested inside it), so nothing is counted twice:

- linear: modules of a class in LINEAR_TYPES (nn.Linear, oneDNN's MkldnnLinear, torch's dynamic int8 Linear; the
  hf_sparse engine adds its own with `register_linear_type`).
- attention: modules whose class name ends in "SelfAttention" (BertSelfAttention and its kin), without their Linear
  children: the head reshapes, QK^T, softmax and PV.
- other: the rest of the forward (embeddings, LayerNorm, GELU, residual adds, pooler, the hook overhead itself).

On CPU every op finishes before the next Python line runs, so wall-clock around a module call is its cost. The
hooks add a few microseconds per module call; `overhead_ms` (median with hooks minus without) shows how much.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch
from torch import nn


LINEAR_TYPES: list[type] = [nn.Linear]
ATTENTION_SUFFIXES: tuple[str, ...] = ("SelfAttention",)
CATEGORIES = ("linear", "attention", "other")


def register_linear_type(cls: type) -> type:
    """Count `cls` modules as Linear layers in profiles (usable as a class decorator)."""
    if cls not in LINEAR_TYPES:
        LINEAR_TYPES.append(cls)
    return cls


def _register_torch_linears() -> None:
    from torch.ao.nn.quantized.dynamic import Linear as DynamicQuantLinear
    from torch.utils.mkldnn import MkldnnLinear

    register_linear_type(DynamicQuantLinear)
    register_linear_type(MkldnnLinear)


_register_torch_linears()


def category_of(module: nn.Module) -> str | None:
    if isinstance(module, tuple(LINEAR_TYPES)):
        return "linear"
    if type(module).__name__.endswith(ATTENTION_SUFFIXES):
        return "attention"
    return None


class _Timer:
    def __init__(self):
        self.totals = dict.fromkeys(CATEGORIES, 0.0)
        self.stack: list[list] = []  # [category, start, time of categorized children]

    def push(self, category: str) -> None:
        self.stack.append([category, time.perf_counter(), 0.0])

    def pop(self) -> None:
        category, start, children = self.stack.pop()
        elapsed = time.perf_counter() - start
        self.totals[category] += elapsed - children
        if self.stack:
            self.stack[-1][2] += elapsed


def profile_module(module: nn.Module, run: Callable[[], object], iters: int = 10, warmup: int = 2) -> dict:
    """Median per-forward milliseconds of each category over `iters` calls of `run` (which calls `module`).

    Returns {"linear_ms", "attention_ms", "other_ms" (medians over the calls), "total_ms" (their sum), "plain_ms"
    (median without hooks), "overhead_ms" (total - plain), "modules": {category: number of modules}}.
    """
    for _ in range(warmup):
        run()
    plain = []
    for _ in range(iters):
        start = time.perf_counter()
        run()
        plain.append(time.perf_counter() - start)

    timer = _Timer()
    handles = []
    counts = dict.fromkeys(CATEGORIES, 0)
    for sub in module.modules():
        category = "other" if sub is module else category_of(sub)
        if category is None:
            continue
        counts[category] += sub is not module
        handles.append(sub.register_forward_pre_hook(lambda *_, c=category: timer.push(c)))
        handles.append(sub.register_forward_hook(lambda *_: timer.pop()))
    samples = []
    try:
        for _ in range(iters):
            timer.totals = dict.fromkeys(CATEGORIES, 0.0)
            run()
            if timer.stack:
                raise RuntimeError("profile hooks unbalanced: a module raised or was called outside forward")
            samples.append(dict(timer.totals))
    finally:
        for handle in handles:
            handle.remove()

    out = {f"{c}_ms": statistics.median(s[c] for s in samples) * 1e3 for c in CATEGORIES}
    out["total_ms"] = sum(out[f"{c}_ms"] for c in CATEGORIES)  # so the parts add up
    out["plain_ms"] = statistics.median(plain) * 1e3
    out["overhead_ms"] = out["total_ms"] - out["plain_ms"]
    out["modules"] = counts
    return out


def top_ops(run: Callable[[], object], iters: int = 3, limit: int = 12) -> str:
    """torch.profiler table of the aten ops with the most self CPU time (the detail behind the categories)."""
    from torch.profiler import ProfilerActivity, profile

    run()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(iters):
            run()
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=limit)


@torch.inference_mode()
def _demo() -> None:  # python profile_torch.py: breakdown of a small random BERT
    from transformers import BertConfig, BertForSequenceClassification

    model = BertForSequenceClassification(BertConfig(num_hidden_layers=2)).eval()
    ids = torch.randint(0, 1000, (1, 128))
    print(profile_module(model, lambda: model(input_ids=ids), iters=5))


if __name__ == "__main__":
    _demo()
