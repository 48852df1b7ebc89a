"""Token-by-token generation with a pruned Llama-shaped decoder: hf_sparse against PyTorch, side by side.

    python benchmarks/speed/bench_decode.py                       # 90% unstructured, 12 layers x 768, 2 threads
    python benchmarks/speed/bench_decode.py --sparsity 0.8 0.9 --pattern unstructured 4-block

A random-weight LlamaForCausalLM (hidden 768, 12 layers, 12 heads, MLP 2048, vocabulary 32000) is pruned with
hf_sparse (one-shot magnitude), then each engine greedily generates --new-tokens tokens after a --prompt-tokens prompt
at batch --batch (M = --batch tokens per step); rounds are interleaved and the median time per generation step
is printed (the prompt's forward included, amortized), with the ratios against PyTorch fp32 and hf_sparse's own layouts:

- torch_fp32: the pruned model in PyTorch fp32 eager;
- torch_dynamic_int8: `torch.ao.quantization.quantize_dynamic` on every Linear (int8 weights, fbgemm);
- hf_sparse_decode: `save_sparse(..., weight_dtype="int8", int8_linears=True)` + `from_pretrained`, layouts by the
  decode rule (what a model that generates gets by default; docs/kernels.md "Dispatch rules");
- hf_sparse_batch: the same checkpoint loaded with HF_SPARSE_WORKLOAD=batch (the encoder-batch layout rule);
- hf_sparse_dense: the decode model with every packed weight re-packed as dense int8 (the same codes and scales):
  hf_sparse's dense int8 path, the reference for "not slower than the dense path" at few tokens.
Every engine must generate the same tokens as torch_fp32 up to int8 rounding; the agreement is printed.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import tempfile
import time

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

import hf_sparse
from hf_sparse.nn import SparseLinear
from hf_sparse.ops import pack_linear, pack_linears


SIZES = {
    "base": {"vocab_size": 32000, "hidden_size": 768, "intermediate_size": 2048, "num_hidden_layers": 12,
             "num_attention_heads": 12, "num_key_value_heads": 12},
    "tiny": {"vocab_size": 512, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
             "num_attention_heads": 4, "num_key_value_heads": 4},  # a smoke run of the harness
}  # fmt: skip


def build(size: str, sparsity: float, pattern: str, seed: int = 0) -> tuple[LlamaForCausalLM, hf_sparse.SparseConfig]:
    torch.manual_seed(seed)
    config = LlamaConfig(**SIZES[size], max_position_embeddings=512, tie_word_embeddings=False)
    model = LlamaForCausalLM(config).eval()
    recipe = hf_sparse.SparseConfig(schedule="one-shot", start=0, sparsity=sparsity, pattern=pattern)
    hf_sparse.sparsify_(model, recipe).remove()
    return model, recipe


def load(model: LlamaForCausalLM, folder: str, workload: str | None) -> torch.nn.Module:
    previous = os.environ.pop("HF_SPARSE_WORKLOAD", None)
    if workload is not None:
        os.environ["HF_SPARSE_WORKLOAD"] = workload
    try:
        return AutoModelForCausalLM.from_pretrained(folder).eval()
    finally:
        os.environ.pop("HF_SPARSE_WORKLOAD", None)
        if previous is not None:
            os.environ["HF_SPARSE_WORKLOAD"] = previous


def force_dense(model: torch.nn.Module) -> torch.nn.Module:
    """Re-pack every SparseLinear (sibling groups whole) of a loaded model as INT8_DENSE, from its stored codes."""
    groups: dict[int, tuple] = {}
    for m in model.modules():
        if not isinstance(m, SparseLinear):
            continue
        if m.group is not None:
            groups.setdefault(id(m.group), (m.group, []))[1].append(m)
            continue
        codes, scale = m.stored_weight()
        dense = pack_linear(
            codes, bias=m.stored_bias(), weight_scale=scale, layout="int8_dense", activation=m.activation
        )
        m._set_packed(dense, None, 0, m.activation)
    for group, members in groups.values():
        members.sort(key=lambda m: m.index)
        stored = [(*m.stored_weight(), m.stored_bias()) for m in members]
        group.packed = pack_linears(
            [c for c, _, _ in stored], biases=[b for _, _, b in stored], weight_scales=[s for _, s, _ in stored],
            layout="int8_dense", activation=group.packed.activation,
        )  # fmt: skip
    return model


def layouts(model: torch.nn.Module) -> str:
    counts: dict[str, int] = {}
    for m in model.modules():
        if isinstance(m, SparseLinear):
            layout = (m.group.packed if m.group is not None else m.packed).layout.value
            counts[layout] = counts.get(layout, 0) + 1
    return ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", choices=sorted(SIZES), default="base")
    p.add_argument("--sparsity", type=float, nargs="+", default=[0.9])
    p.add_argument("--pattern", nargs="+", default=["unstructured"])
    p.add_argument("--batch", type=int, default=1, help="sequences generated together (M per step)")
    p.add_argument("--prompt-tokens", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(f"isa {hf_sparse.ops.isa()}, CSR few-token kernel {hf_sparse.ops._extension.quads_few_variant()}, "
          f"{args.threads} threads, torch {torch.__version__}")  # fmt: skip
    for pattern in args.pattern:
        for sparsity in args.sparsity:
            model, recipe = build(args.size, sparsity, pattern)
            with tempfile.TemporaryDirectory() as folder:
                hf_sparse.save_sparse(model, folder, recipe, weight_dtype="int8", int8_linears=True)
                engines = {
                    "torch_fp32": model,
                    "torch_dynamic_int8": torch.ao.quantization.quantize_dynamic(
                        copy.deepcopy(model), {torch.nn.Linear}, dtype=torch.qint8
                    ),
                    "hf_sparse_decode": load(model, folder, "decode"),
                    "hf_sparse_batch": load(model, folder, "batch"),
                    "hf_sparse_dense": force_dense(load(model, folder, None)),
                }
            for name in ("hf_sparse_decode", "hf_sparse_batch", "hf_sparse_dense"):
                print(f"  {name}: {layouts(engines[name])}")
            vocab = model.config.vocab_size
            shape = (args.batch, args.prompt_tokens)
            prompt = torch.randint(3, vocab, shape, generator=torch.Generator().manual_seed(1))
            kw = {
                "max_new_tokens": args.new_tokens, "min_new_tokens": args.new_tokens, "do_sample": False,
                "attention_mask": torch.ones_like(prompt), "pad_token_id": 0,
            }  # fmt: skip
            times: dict[str, list[float]] = {n: [] for n in engines}
            outputs = {}
            with torch.inference_mode():
                for name, m in engines.items():
                    outputs[name] = m.generate(prompt, **kw)  # warm-up, and the tokens compared below
                for _ in range(args.rounds):
                    for name, m in engines.items():
                        start = time.perf_counter()
                        m.generate(prompt, **kw)
                        times[name].append((time.perf_counter() - start) / args.new_tokens * 1e3)
            ref = outputs["torch_fp32"][:, args.prompt_tokens :]
            base = statistics.median(times["torch_fp32"])
            dense = statistics.median(times["hf_sparse_dense"])
            print(f"\n{sparsity:.0%} {pattern}, batch {args.batch}, prompt {args.prompt_tokens}, {args.new_tokens} new tokens, "
                  f"median of {args.rounds} rounds")  # fmt: skip
            print("| engine | ms per step | vs torch_fp32 | vs hf_sparse_dense | tokens equal to torch_fp32 |")
            print("|---|---:|---:|---:|---:|")
            for name, t in times.items():
                med = statistics.median(t)
                same = int((outputs[name][:, args.prompt_tokens :] == ref).sum())
                print(f"| {name} | {med:.2f} | {base / med:.2f}x | {dense / med:.2f}x | {same}/{ref.numel()} |")


if __name__ == "__main__":
    main()
