"""Two ways of running the same fused encoder, side by side in one process, interleaved.

    python benchmarks/speed/bench_encoder_stack.py                       # BERT-base 90% int8, both patterns
    python benchmarks/speed/bench_encoder_stack.py --pattern 4-block --batch 1 --rounds 20
    python benchmarks/speed/bench_encoder_stack.py --compare pack_qkv    # Q/K/V packed for the attention or not
    python benchmarks/speed/bench_encoder_stack.py --compare feature_major --pattern 4-block
    python benchmarks/speed/bench_encoder_stack.py --compare embeddings --pattern 4-block
    python benchmarks/speed/bench_encoder_stack.py --compare attention --pattern 4-block

--compare stack (default): the whole encoder in one call (`FusedEncoderStackForward`) against its layers called
one by one (the encoder's one-call forward taken off the instance: the class's forward, every layer still fused,
called from Python one after the other).
--compare pack_qkv: the Q/K/V product writing bf16 straight into the attention's packed layout
(`FusedEncoderLayer.pack_qkv`, the default) against float32 Q/K/V rows that the attention packs itself.
--compare feature_major: the steps on feature-major tiles (`FusedEncoderLayer.feature_major`, the default; int8
4-block weights only) against token rows.
--compare embeddings: the embedding module in one kernel call (`FusedEmbeddingsForward`) against the class's
forward (seven PyTorch ops); logits agree up to the LayerNorm's last bits carried through twelve layers of int8
rounding (checked within 5e-2 of the largest logit: 1.4% measured on the random-weight 90% BERT-base at batch 1,
whose logits are small, 0.004 in absolute terms, as far as either is from the float32 model's).
--compare attention: the fused layers' attention in int8 (`set_attention_precision("int8")`: Q, K, V and the
probabilities quantized, both products on VNNI) against bf16 (the default); the logits differ by the attention's
rounding through twelve layers (checked within 2e-1 of the largest logit; docs/kernels.md gives the errors).

The model is the speed benchmark's (random BERT-base weights, magnitude-pruned, `save_sparse` + `from_pretrained`).
Each round times `--iters` forwards one way, then the other (which one first alternates), so both see the same
machine state; the logits must be equal (close, for embeddings). Prints the median over rounds of each round's median, and the speed-up.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch


sys.path.insert(0, str(Path(__file__).resolve().parent))

from engine_from_pretrained import load_bench_model  # noqa: E402
from models import build_model  # noqa: E402

from hf_sparse.integrations.embeddings import FusedEmbeddingsForward  # noqa: E402
from hf_sparse.integrations.encoder_layer import FusedEncoderForward  # noqa: E402
from hf_sparse.integrations.encoder_stack import FusedEncoderStackForward  # noqa: E402
from hf_sparse.ops import kernel_calls, set_attention_precision  # noqa: E402


def _encoder(model: torch.nn.Module) -> torch.nn.Module:
    for module in model.modules():
        if isinstance(vars(module).get("forward"), FusedEncoderStackForward):
            return module
    raise RuntimeError("the loaded model has no encoder running in one call (FusedEncoderStackForward)")


def _ways_stack(model) -> tuple[dict[str, Callable[[], None]], Callable[[], None]]:
    """ "layers" (one by one) and "stack" (one call), and what restores the model."""
    encoder = _encoder(model)
    stack = vars(encoder)["forward"]
    ways = {
        "layers": lambda: vars(encoder).pop("forward", None),
        "stack": lambda: encoder.__dict__.__setitem__("forward", stack),
    }
    return ways, ways["stack"]


def _ways_embeddings(model) -> tuple[dict[str, Callable[[], None]], Callable[[], None]]:
    """ "class" (the embedding module's own forward) and "fused" (one kernel call), and what restores the model."""
    found = [
        (m, vars(m)["forward"]) for m in model.modules() if isinstance(vars(m).get("forward"), FusedEmbeddingsForward)
    ]
    if not found:
        raise RuntimeError("the loaded model has no fused embeddings (FusedEmbeddingsForward)")
    (module, fused), *_ = found
    ways = {
        "class": lambda: vars(module).pop("forward", None),
        "fused": lambda: module.__dict__.__setitem__("forward", fused),
    }
    return ways, ways["fused"]


def _ways_attention(model) -> tuple[dict[str, Callable[[], None]], Callable[[], None]]:
    """ "bf16" and "int8" attention (`set_attention_precision`), and what restores the setting."""
    previous = set_attention_precision(None)
    set_attention_precision(previous)
    ways = {"bf16": lambda: set_attention_precision("bf16"), "int8": lambda: set_attention_precision("int8")}
    return ways, lambda: set_attention_precision(previous)


def _check_attention(model) -> None:
    """After the int8 forward: the int8 kernels must have run."""
    if not any(n for name, n in kernel_calls("attention").items() if name.endswith("_int8")):
        raise RuntimeError("the int8 attention did not run (the layers were not fused): nothing to compare")


def _fused_layers(model) -> list:
    """The model's FusedEncoderLayers (from their FusedEncoderForward)."""
    layers = [
        vars(m)["forward"].fused for m in model.modules() if isinstance(vars(m).get("forward"), FusedEncoderForward)
    ]
    if not layers:
        raise RuntimeError("the loaded model has no fused encoder layers (FusedEncoderForward)")
    return layers


def _ways_flag(model, attr: str, names: tuple[str, str]) -> tuple[dict[str, Callable[[], None]], Callable[[], None]]:
    """names[0] with every fused layer's `attr` off, names[1] with it on, and what restores the model."""
    layers = _fused_layers(model)
    before = [getattr(layer, attr) for layer in layers]

    def use(value: bool) -> None:
        for layer in layers:
            setattr(layer, attr, value)

    def restore() -> None:
        for layer, value in zip(layers, before):
            setattr(layer, attr, value)

    return {names[0]: lambda: use(False), names[1]: lambda: use(True)}, restore


def _check_pack_qkv(model) -> None:
    """After a forward with packing on: it must have run (else the comparison measures nothing)."""
    if not all(layer.qkv_packed for layer in _fused_layers(model)):
        raise RuntimeError(
            "Q/K/V were not packed for the attention (needs the AVX512-BF16 attention, sparse int8 Q/K/V, head_dim a "
            "multiple of 16 and sequences of 32 tokens or more): nothing to compare"
        )


def _check_feature_major(model) -> None:
    """After a forward with feature-major tiles on: they must have been used."""
    if not all(layer.ran_feature_major for layer in _fused_layers(model)):
        raise RuntimeError(
            "the layers did not run on feature-major tiles (needs the AVX-512 kernels, int8 4-block weights, a hidden "
            "size and sequence length that are multiples of 16): nothing to compare"
        )


COMPARISONS = {
    "stack": _ways_stack,
    "pack_qkv": lambda model: _ways_flag(model, "pack_qkv", ("unpacked", "packed")),
    "feature_major": lambda model: _ways_flag(model, "feature_major", ("token-major", "feature-major")),
    "embeddings": _ways_embeddings,
    "attention": _ways_attention,
}
CHECKS = {"pack_qkv": _check_pack_qkv, "feature_major": _check_feature_major, "attention": _check_attention}
LABELS = {
    "stack": ("layers one by one", "one call"),
    "pack_qkv": ("float32 Q/K/V", "packed Q/K/V"),
    "feature_major": ("token rows", "feature-major tiles"),
    "embeddings": ("embeddings in PyTorch", "fused embeddings"),
    "attention": ("bf16 attention", "int8 attention"),
}
# comparisons whose two ways round differently: logits within this fraction of the largest one
TOLERANCES = {"embeddings": 5e-2, "attention": 2e-1}


def compare(model, inputs, rounds: int, iters: int, what: str = "stack") -> dict[str, float]:
    """Median ms per forward each way of `what` (COMPARISONS: the baseline first, then the default)."""
    ways, restore = COMPARISONS[what](model)
    medians = {name: [] for name in ways}
    try:
        with torch.inference_mode():
            outputs = {}
            for name, use in ways.items():
                use()
                outputs[name] = model(**inputs).logits
            if what in CHECKS:
                CHECKS[what](model)
            first, second = outputs.values()
            if what in TOLERANCES:
                print(f"  logits: largest |difference| {float((first - second).abs().max()):.3e}, largest |logit| "
                      f"{float(first.abs().max()):.3e}")  # fmt: skip
            tol = TOLERANCES.get(what, 0.0) * float(first.abs().max())
            if not (torch.equal(first, second) or float((first - second).abs().max()) <= tol):
                raise RuntimeError(f"{' and '.join(ways)} gave different logits")
            for r in range(rounds):
                for name in list(ways)[:: 1 if r % 2 == 0 else -1]:
                    ways[name]()
                    times = []
                    for _ in range(iters):
                        start = time.perf_counter()
                        model(**inputs)
                        times.append(time.perf_counter() - start)
                    medians[name].append(statistics.median(times))
    finally:
        restore()
    return {name: statistics.median(values) * 1e3 for name, values in medians.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pattern", nargs="+", default=["4-block", "unstructured"])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--sparsity", type=float, default=0.9)
    parser.add_argument("--size", default="base", help="models.py size (base; tiny for a smoke test)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--iters", type=int, default=0, help="forwards per round and way (0: ~0.4 s of them)")
    parser.add_argument("--compare", choices=sorted(COMPARISONS), default="stack", help="which two ways (see above)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    base, new = LABELS[args.compare]
    print(f"| pattern | batch | {base} (ms) | {new} (ms) | speed-up |")
    print("|---|---:|---:|---:|---:|")
    for pattern in args.pattern:
        bench = build_model(args.size, args.sparsity, pattern)
        model = load_bench_model(bench)
        for batch in args.batch:
            inputs = bench.inputs(batch)
            iters = args.iters
            if iters <= 0:
                with torch.inference_mode():
                    start = time.perf_counter()
                    model(**inputs)
                    iters = max(1, int(0.4 / max(time.perf_counter() - start, 1e-4)))
            slow, fast = compare(model, inputs, args.rounds, iters, args.compare).values()
            print(f"| {pattern} | {batch} | {slow:.2f} | {fast:.2f} | {slow / fast:.3f}x |")


if __name__ == "__main__":
    main()
