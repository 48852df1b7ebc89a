"""Helpers for the kernel tests: weights with a given zero pattern, and running under each instruction set."""

from __future__ import annotations

import contextlib

import torch

from hf_sparse import ops


# Every instruction set this machine can run ("reference" = pure torch, when the extension is missing).
ISAS = ops.available_isas() or ["reference"]
PATTERNS = ("unstructured", "4-block", "dense")


# The instruction set of the run (HF_SPARSE_ISA's, or the fastest): what a test that switches restores
RUN_ISA = ops.isa()


@contextlib.contextmanager
def using_isa(name: str):
    if name == "reference":
        yield
        return
    previous = ops.isa()  # (HF_SPARSE_ISA may have forced a lower one for the whole run)
    ops.set_isa(name)
    try:
        yield
    finally:
        ops.set_isa(previous)


def make_weight(n: int, k: int, sparsity: float, pattern: str, gen: torch.Generator) -> torch.Tensor:
    """A random (n, k) weight whose zeros follow `pattern` at about `sparsity`."""
    w = torch.randn(n, k, generator=gen)
    if pattern == "dense" or sparsity <= 0:
        return w
    if pattern == "unstructured":
        return w * (torch.rand(n, k, generator=gen) >= sparsity)
    kb = (k + 3) // 4
    keep = (torch.rand(n, kb, generator=gen) >= sparsity).repeat_interleave(4, dim=1)[:, :k]
    return w * keep


def assert_same(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    """Bitwise equality (NaN equal to NaN), reporting the first differing index."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    same = (
        (actual == expected) | (torch.isnan(actual) & torch.isnan(expected))
        if actual.is_floating_point()
        else (actual == expected)
    )
    if not bool(same.all()):
        idx = tuple(int(i) for i in torch.nonzero(~same)[0])
        raise AssertionError(
            f"{what}: {int((~same).sum())} of {same.numel()} entries differ; first at index {idx}: "
            f"got {actual[idx].item()!r}, expected {expected[idx].item()!r}"
        )


def assert_close(actual: torch.Tensor, expected: torch.Tensor, what: str, rtol: float, atol: float) -> None:
    """|actual - expected| <= atol + rtol |expected| everywhere, reporting the worst index."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    err = (actual.double() - expected.double()).abs() - (atol + rtol * expected.double().abs())
    if bool((err > 0).any()) or bool(torch.isnan(actual).any()):
        idx = tuple(int(i) for i in torch.nonzero(torch.isnan(actual) | (err == err.max()))[0])
        raise AssertionError(
            f"{what}: worst entry {idx}: got {actual[idx].item()!r}, expected {expected[idx].item()!r} "
            f"(rtol={rtol}, atol={atol})"
        )
