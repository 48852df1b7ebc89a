"""The whole encoder in one call (`FusedEncoderStackForward`) against its layers called one by one, interleaved.

    python benchmarks/speed/bench_encoder_stack.py                       # BERT-base 90% int8, both patterns
    python benchmarks/speed/bench_encoder_stack.py --pattern 4-block --batch 1 --rounds 20

The model is the speed benchmark's (random BERT-base weights, magnitude-pruned, `save_sparse` + `from_pretrained`).
The same loaded model runs both ways: with the encoder's one-call forward, and with it taken off the instance (the
class's forward: every layer still fused, called from Python one after the other). Each round times `--iters`
forwards one way, then the other (which one first alternates), so both see the same machine state; the logits must
be equal. Prints the median over rounds of each round's median, and the speed-up.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch


sys.path.insert(0, str(Path(__file__).resolve().parent))

from engine_from_pretrained import load_bench_model  # noqa: E402
from models import build_model  # noqa: E402

from hf_sparse.integrations.encoder_stack import FusedEncoderStackForward  # noqa: E402


def _encoder(model: torch.nn.Module) -> torch.nn.Module:
    for module in model.modules():
        if isinstance(vars(module).get("forward"), FusedEncoderStackForward):
            return module
    raise RuntimeError("the loaded model has no encoder running in one call (FusedEncoderStackForward)")


def compare(model, inputs, rounds: int, iters: int) -> dict[str, float]:
    """Median ms per forward with the one-call encoder ("stack") and with its layers one by one ("layers")."""
    encoder = _encoder(model)
    stack = vars(encoder)["forward"]
    modes = {
        "stack": lambda: encoder.__dict__.__setitem__("forward", stack),
        "layers": lambda: vars(encoder).pop("forward", None),
    }
    medians = {name: [] for name in modes}
    try:
        with torch.inference_mode():
            outputs = {}
            for name, use in modes.items():
                use()
                outputs[name] = model(**inputs).logits
            if not torch.equal(outputs["stack"], outputs["layers"]):
                raise RuntimeError("the one-call encoder and its layers one by one gave different logits")
            for r in range(rounds):
                for name in list(modes)[:: 1 if r % 2 == 0 else -1]:
                    modes[name]()
                    times = []
                    for _ in range(iters):
                        start = time.perf_counter()
                        model(**inputs)
                        times.append(time.perf_counter() - start)
                    medians[name].append(statistics.median(times))
    finally:
        encoder.__dict__["forward"] = stack
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
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print("| pattern | batch | layers one by one (ms) | one call (ms) | speed-up |")
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
            ms = compare(model, inputs, args.rounds, iters)
            print(
                f"| {pattern} | {batch} | {ms['layers']:.2f} | {ms['stack']:.2f} | {ms['layers'] / ms['stack']:.3f}x |"
            )


if __name__ == "__main__":
    main()
