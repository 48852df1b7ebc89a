"""The user path as a benchmark engine: `save_sparse` the pruned model, then `from_pretrained` it (hf_sparse backend).

    python benchmarks/speed/bench_speed.py --extra-engines benchmarks/speed/engine_from_pretrained.py \
        --engines torch_eager deepsparse_int8 hf_sparse_int8 --sparsity 0.9 --pattern 4-block --batch 1 16
    python benchmarks/speed/engine_from_pretrained.py      # per-call overheads and where a forward's time goes
    python benchmarks/speed/engine_from_pretrained.py --attention-error     # bf16 / int8 vs fp32 attention

Engine "hf_sparse_int8": the pruned model is written with `hf_sparse.save_sparse(..., weight_dtype="int8",
int8_linears=True)` (the pooler and classifier as dense int8: every Linear quantized, as in DeepSparse's int8 file) to a
temporary folder and loaded with `AutoModelForSequenceClassification.from_pretrained`, exactly as a user would
(`import hf_sparse` registers the backend): every encoder layer runs fused, as one call of six kernel steps (Q/K/V
packed together, bf16 attention, attention output, residual add + LayerNorm, the fused FFN, residual add + LayerNorm;
docs/kernels.md, "Attention"); the embeddings stay float32 PyTorch, as in the other engines.
"hf_sparse_fp32" loads float32 weights (the sparse fp32 kernel). Off by default, the same loaded int8 model with one
setting switched while it runs: "hf_sparse_int8_pool" (kernel threads from hf_sparse's pool) and
"hf_sparse_int8_fp32attn" (`set_attention_precision("fp32")`: the layers' own forward, attention and LayerNorms in
PyTorch float32, as DeepSparse computes attention in deepsparse_int8's file) and "hf_sparse_int8_attn"
(`set_attention_precision("int8")`: int8 attention, against deepsparse_int8_attn's file). The switch is
process-wide and the engines run interleaved, so every runner sets its own precision ("bf16" unless it says
otherwise) around each call.
"""

from __future__ import annotations

import statistics
import tempfile
import time

import torch
from engines import EngineContext, EngineUnavailable, Runner, TorchRunner, register_engine
from profile_torch import profile_module, register_linear_type
from transformers import AutoModelForSequenceClassification

import hf_sparse
import hf_sparse.ops
from hf_sparse.integrations.quantizer import require_registered
from hf_sparse.nn import FusedEncoderLayer, SparseLinear


register_linear_type(SparseLinear)


def load_through_from_pretrained(ctx: EngineContext, weight_dtype: str) -> torch.nn.Module:
    """save_sparse the benchmark's pruned model, then from_pretrained it; checks that the backend really ran."""
    if not hf_sparse.ops.extension_available():
        raise EngineUnavailable(
            "the hf_sparse C++ extension is not loaded (its pure-torch reference is not worth timing); "
            "rebuild with `pip install -e . --no-build-isolation`"
        )
    require_registered()  # otherwise from_pretrained would silently load random Linear weights
    bench = ctx.bench
    pattern = bench.pattern if bench.sparsity > 0 else "unstructured"
    recipe = hf_sparse.SparseConfig(schedule="one-shot", start=0, sparsity=max(bench.sparsity, 0.5), pattern=pattern)
    with tempfile.TemporaryDirectory(prefix="hf_sparse_bench_") as folder:
        # int8: every Linear in int8, as DeepSparse's int8 file quantizes every Linear MatMul (pooler and head too)
        int8 = weight_dtype == "int8"
        hf_sparse.save_sparse(bench.model, folder, recipe, weight_dtype=weight_dtype, int8_linears=int8)
        model = AutoModelForSequenceClassification.from_pretrained(folder)
    sparse = [m for m in model.modules() if isinstance(m, SparseLinear)]
    if not sparse:
        raise RuntimeError("from_pretrained loaded no SparseLinear: the hf_sparse backend did not run")
    ctx.log(f"  hf_sparse backend: {len(sparse)} Linears on {hf_sparse.ops.isa()} kernels")
    return model.eval()


def load_bench_model(bench, weight_dtype: str = "int8") -> torch.nn.Module:
    """`load_through_from_pretrained` for scripts outside the harness: `bench` is a models.BenchModel."""

    class _Context:  # the little of EngineContext that load_through_from_pretrained uses
        def __init__(self):
            self.bench, self.log = bench, print

    return load_through_from_pretrained(_Context(), weight_dtype)


_STEP_CATEGORY = {"qkv": "linear", "out": "linear", "ffn": "linear", "attention": "attention"}


def _category_totals(step_times: dict[str, float]) -> dict[str, float]:
    """`FusedEncoderLayer.step_times` (seconds per step) per category (layer norms go to "other")."""
    totals = {"linear": 0.0, "attention": 0.0}
    for step, seconds in step_times.items():
        if step in _STEP_CATEGORY:
            totals[_STEP_CATEGORY[step]] += seconds
    return totals


class FromPretrainedRunner(TorchRunner):
    def __init__(self, module, inputs, *, threads_backend: str | None = None, attention: str = "bf16", **info):
        super().__init__(module, inputs, **info)
        self.threads_backend, self.attention = threads_backend, attention

    def run(self):
        """As TorchRunner, with `attention` ("bf16", "int8" or "fp32") as the attention precision and
        `threads_backend` ("openmp" or "pool") as the kernels' threads when set, restored afterwards (so timing, the
        output check and the profile all run on them)."""
        previous_attention = hf_sparse.ops.set_attention_precision(self.attention)
        if self.threads_backend is not None:
            previous_threads = hf_sparse.ops.threads_backend()
            hf_sparse.ops.set_threads_backend(self.threads_backend)
        try:
            return super().run()
        finally:
            if self.threads_backend is not None:
                hf_sparse.ops.set_threads_backend(previous_threads)
            hf_sparse.ops.set_attention_precision(previous_attention)

    def profile(self, iters: int = 10, warmup: int = 2) -> dict:
        """Where the time goes. Forward hooks would switch the fused encoder layers off (they run only when nothing
        watches their modules), so when they are in use their own step timer (`FusedEncoderLayer.step_times`) times
        their steps instead (with whole sequences per thread: each step's mean over the threads);
        "other" is the rest of the forward (layer norms, embeddings, pooler, classifier, Python)."""
        if not _uses_fused_layers(self):
            return profile_module(self.module, self.run, iters=iters, warmup=warmup)
        for _ in range(warmup):
            self.run()
        plain, samples = [], []
        for _ in range(iters):
            start = time.perf_counter()
            self.run()
            plain.append(time.perf_counter() - start)
        try:
            for _ in range(iters):
                FusedEncoderLayer.step_times = times = {}
                start = time.perf_counter()
                self.run()
                samples.append({**_category_totals(times), "total": time.perf_counter() - start})
        finally:
            FusedEncoderLayer.step_times = None
        out = {f"{c}_ms": statistics.median(s[c] for s in samples) * 1e3 for c in ("linear", "attention", "total")}
        out["other_ms"] = statistics.median(s["total"] - s["linear"] - s["attention"] for s in samples) * 1e3
        out["total_ms"] = out["linear_ms"] + out["attention_ms"] + out["other_ms"]
        out["plain_ms"] = statistics.median(plain) * 1e3
        out["overhead_ms"] = out["total_ms"] - out["plain_ms"]
        out["note"] = "fused encoder layers, timed per kernel call"
        return out


def _uses_fused_layers(runner: TorchRunner) -> bool:
    """Whether a forward of the runner goes through at least one FusedEncoderLayer fast path."""
    FusedEncoderLayer.step_times = times = {}
    try:
        runner.run()
    finally:
        FusedEncoderLayer.step_times = None
    return bool(times)


def _setup(
    ctx: EngineContext, batch: int, weight_dtype: str, threads_backend: str | None = None, attention: str = "bf16"
) -> Runner:
    model = ctx.memo(
        f"hf_sparse_from_pretrained_{weight_dtype}", lambda: load_through_from_pretrained(ctx, weight_dtype)
    )
    info = {
        "isa": hf_sparse.ops.isa(),
        "threads": threads_backend or hf_sparse.ops.threads_backend(),
        "attention_precision": attention,
        # fp32 attention is the layers' own PyTorch code, no kernel of ours
        "attention_kernel": "torch" if attention == "fp32" else hf_sparse.ops.attention_isa(attention),
    }
    return FromPretrainedRunner(
        model, ctx.bench.inputs(batch), threads_backend=threads_backend, attention=attention, **info
    )


@register_engine(
    "hf_sparse_int8",
    precision="int8",
    help="save_sparse(weight_dtype='int8') + from_pretrained: hf_sparse's backend (sparse int8 kernels, fused QKV/GELU)",
)
def _hf_sparse_int8(ctx: EngineContext, batch: int) -> Runner:
    return _setup(ctx, batch, "int8")


@register_engine(
    "hf_sparse_int8_pool",
    precision="int8",
    default=False,
    help="hf_sparse_int8 with its kernels on hf_sparse's own thread pool (HF_SPARSE_THREADS=pool) while timed",
)
def _hf_sparse_int8_pool(ctx: EngineContext, batch: int) -> Runner:
    return _setup(ctx, batch, "int8", threads_backend="pool")


@register_engine(
    "hf_sparse_int8_fp32attn",
    precision="int8",
    default=False,
    help="hf_sparse_int8 with float32 attention (HF_SPARSE_ATTENTION=fp32: the layers' own PyTorch attention and "
    "LayerNorms, Linears on the kernels), as DeepSparse computes attention",
)
def _hf_sparse_int8_fp32attn(ctx: EngineContext, batch: int) -> Runner:
    return _setup(ctx, batch, "int8", attention="fp32")


@register_engine(
    "hf_sparse_int8_attn",
    precision="int8",
    default=False,
    help="hf_sparse_int8 with int8 attention (HF_SPARSE_ATTENTION=int8: Q/K/V and the probabilities quantized, "
    "int32 products), as deepsparse_int8_attn's file computes attention",
)
def _hf_sparse_int8_attn(ctx: EngineContext, batch: int) -> Runner:
    return _setup(ctx, batch, "int8", attention="int8")


@register_engine(
    "hf_sparse_fp32",
    precision="fp32",
    help="save_sparse(weight_dtype='float32') + from_pretrained: hf_sparse's backend on the sparse fp32 kernel",
)
def _hf_sparse_fp32(ctx: EngineContext, batch: int) -> Runner:
    return _setup(ctx, batch, "float32")


# ---- `python benchmarks/speed/engine_from_pretrained.py`: overheads, measured in thread CPU time on 1 thread -------
def _cpu_us(fn, iters: int, repeats: int = 5) -> float:
    """Best of `repeats` averages of `iters` calls, in microseconds of this thread's CPU time (which other processes
    on a busy machine do not inflate)."""
    import time

    for _ in range(max(iters // 10, 1)):
        fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.thread_time()
        for _ in range(iters):
            fn()
        best = min(best, (time.thread_time() - start) / iters)
    return best * 1e6


def _per_call_overheads() -> None:
    from hf_sparse.nn import pack_siblings
    from hf_sparse.quantization import quantize_weight_int8

    def linear(out=64, k=64, seed=0):
        g = torch.Generator().manual_seed(seed)
        codes, scale = quantize_weight_int8(torch.randn(out, k, generator=g))
        m = SparseLinear(k, out, True, storage_dtype="int8")
        with torch.no_grad():
            m.weight.copy_(codes)
            m.weight_scale.copy_(scale[:, None])
            m.bias.zero_()
        return m

    single = linear()
    single.pack()
    dense = torch.nn.Linear(64, 64)
    separate = [linear(seed=i) for i in range(3)]
    for m in separate:
        m.pack()
    siblings = [linear(seed=i) for i in range(3)]
    pack_siblings(siblings, ["q", "k", "v"])
    rows = []
    with torch.inference_mode():
        x = torch.randn(1, 64)
        rows.append(("PackedLinear(x), the op layer's direct path", _cpu_us(lambda: single.packed(x), 20000)))
        rows.append(("SparseLinear module (what from_pretrained installs)", _cpu_us(lambda: single(x), 20000)))
        rows.append(("nn.Linear (F.linear), for scale", _cpu_us(lambda: dense(x), 20000)))
        rows.append(("3 separate SparseLinears on one input", _cpu_us(lambda: [m(x) for m in separate], 10000)))
        rows.append(
            ("3 siblings (Q/K/V SiblingGroup: one kernel call)", _cpu_us(lambda: [m(x) for m in siblings], 10000))
        )
    print("\nPer-call cost, 64x64 int8 weight, M = 1, 1 thread, inference_mode (us of thread CPU time):")
    print("| call | us |\n|---|---|")
    for name, us in rows:
        print(f"| {name} | {us:.2f} |")


def _fixed_cost() -> None:
    """A 12-layer BERT with hidden 64 on 8 tokens: nearly no arithmetic, so a forward's time is its fixed cost."""
    import tempfile

    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(hidden_size=64, num_hidden_layers=12, num_attention_heads=2, intermediate_size=256)
    model = BertForSequenceClassification(config).eval()
    recipe = hf_sparse.SparseConfig(schedule="one-shot", start=0, sparsity=0.9, pattern="4-block")
    hf_sparse.sparsify_(model, recipe).remove()
    with tempfile.TemporaryDirectory() as folder:
        hf_sparse.save_sparse(model, folder, recipe, weight_dtype="int8")
        backend = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    ids = torch.randint(1000, 2000, (1, 8), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        eager = _cpu_us(lambda: model(input_ids=ids), 100) / 1e3
        total = _cpu_us(lambda: backend(input_ids=ids), 100) / 1e3
    print("\nFixed cost of a forward: 12-layer BERT, hidden 64, 8 tokens, 1 thread (ms of thread CPU time):")
    print(f"| torch_eager fp32 | hf_sparse_int8 (from_pretrained) |\n|---|---|\n| {eager:.2f} | {total:.2f} |")


def _bert_base_split(sparsity: float, pattern: str) -> None:
    import copy
    import time

    import engines_hf_sparse
    from models import build_model

    bench = build_model("base", sparsity, pattern)
    start = time.perf_counter()
    backend = load_bench_model(bench)
    print(f"save_sparse + from_pretrained: {time.perf_counter() - start:.1f} s (wall, busy machine)")
    swapped = engines_hf_sparse.convert(copy.deepcopy(bench.model), "int8")
    spent = {"linear": 0.0}
    originals = {SparseLinear: SparseLinear.forward, hf_sparse.ops.FusedFFN: hf_sparse.ops.FusedFFN.__call__}

    def timing(call):
        def timed(self, x):
            t = time.thread_time()
            y = call(self, x)
            spent["linear"] += time.thread_time() - t
            return y

        return timed

    print(
        f"\nBERT-base {sparsity:.0%} {pattern}, seq {bench.seq_len}, 1 thread, best of 5 forwards (ms of thread CPU time):"
    )
    print("| batch | torch_eager fp32 | hf_sparse_ops_int8 (module swap) | hf_sparse_int8 (from_pretrained) | "
          "of which kernel calls | rest | swap / from_pretrained |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    for batch in (1, 16):
        inputs = bench.inputs(batch)
        with torch.inference_mode():
            eager = _cpu_us(lambda inputs=inputs: bench.model(**inputs), 1, 2 if batch > 1 else 5) / 1e3
            swap = _cpu_us(lambda inputs=inputs: swapped(**inputs), 1, 3 if batch > 1 else 5) / 1e3
            total = _cpu_us(lambda inputs=inputs: backend(**inputs), 1, 3 if batch > 1 else 5) / 1e3
            SparseLinear.forward = timing(originals[SparseLinear])
            hf_sparse.ops.FusedFFN.__call__ = timing(originals[hf_sparse.ops.FusedFFN])
            best = (float("inf"), 0.0)
            for _ in range(3 if batch > 1 else 5):
                spent["linear"] = 0.0
                t = time.thread_time()
                backend(**inputs)
                best = min(best, (time.thread_time() - t, spent["linear"]))
            SparseLinear.forward = originals[SparseLinear]
            hf_sparse.ops.FusedFFN.__call__ = originals[hf_sparse.ops.FusedFFN]
        linear_ms = best[1] * 1e3
        print(f"| {batch} | {eager:.1f} | {swap:.1f} | {total:.1f} | {linear_ms:.1f} | {best[0] * 1e3 - linear_ms:.1f} "
              f"| {swap / total:.2f}x |")  # fmt: skip


def _attention_error(sparsity: float, pattern: str) -> None:
    """bf16 and int8 attention (the fused layers' numerics) against float32 attention, on BERT-base shapes: the op
    alone on random Q/K/V at three score spreads, then the logits of the from_pretrained model with each precision. Errors are max |difference| over max |float64 result|; torch's own fp32 SDPA is given for scale."""
    import torch.nn.functional as F
    from models import build_model

    batch, seq, heads, d = 8, 128, 12, 64
    print(f"\nAttention op, batch {batch}, seq {seq}, {heads} heads x {d} (BERT-base), random Q/K/V ~ N(0, 1);")
    print("error of the context (max |diff| / max |context|) against float64 attention:")
    print("| score std | bf16 (Q/K/V/P) | int8 (Q/K/V/P) | torch SDPA float32 | mean abs, bf16 | mean abs, int8 |")
    print("|---|---|---|---|---|---|")
    gen = torch.Generator().manual_seed(0)
    for spread in (1.0, 3.0, 8.0):  # std of q . k * d^-0.5; trained models reach the peaky end
        q, k, v = (torch.randn(batch * seq, heads * d, generator=gen) for _ in range(3))
        q = q * spread
        ours = hf_sparse.ops.attention((q, k, v), heads=heads, batch=batch)
        int8 = hf_sparse.ops.attention((q, k, v), heads=heads, batch=batch, precision="int8")

        def split(t, dtype):
            return t.reshape(batch, seq, heads, d).transpose(1, 2).to(dtype)

        exact = F.scaled_dot_product_attention(*(split(t, torch.float64) for t in (q, k, v)))
        exact = exact.transpose(1, 2).reshape(batch * seq, heads * d)
        sdpa = F.scaled_dot_product_attention(*(split(t, torch.float32) for t in (q, k, v)))
        sdpa = sdpa.transpose(1, 2).reshape(batch * seq, heads * d)
        top = float(exact.abs().max())
        err, err8 = (ours.double() - exact).abs(), (int8.double() - exact).abs()
        print(f"| {spread:g} | {float(err.max()) / top:.2e} | {float(err8.max()) / top:.2e} "
              f"| {float((sdpa.double() - exact).abs().max()) / top:.2e} | {float(err.mean()) / top:.2e} "
              f"| {float(err8.mean()) / top:.2e} |")  # fmt: skip

    bench = build_model("base", sparsity, pattern)
    model = load_bench_model(bench)
    print(f"\nBERT-base {sparsity:.0%} {pattern} int8 (from_pretrained, random weights), seq {bench.seq_len}: logits "
          "with bf16 attention (fused layers) vs HF_SPARSE_ATTENTION=fp32, and each vs torch_eager fp32;")  # fmt: skip
    print("differences as max |diff| / max |fp32-attention logit|:")
    print("| batch | bf16 vs fp32 attention | int8 vs fp32 attention | fp32 attention vs torch_eager "
          "| bf16 attention vs torch_eager |")  # fmt: skip
    print("|---|---|---|---|---|")
    for b in (1, 16):
        inputs = bench.inputs(b)
        with torch.inference_mode():
            fused = model(**inputs).logits
            previous = hf_sparse.ops.set_attention_precision("fp32")
            try:
                plain = model(**inputs).logits
                hf_sparse.ops.set_attention_precision("int8")
                quant = model(**inputs).logits
            finally:
                hf_sparse.ops.set_attention_precision(previous)
            eager = bench.model(**inputs).logits
        top = float(plain.abs().max())
        pairs = ((fused, plain), (quant, plain), (plain, eager), (fused, eager))
        diffs = [float((a - c).abs().max()) / top for a, c in pairs]
        print(f"| {b} | " + " | ".join(f"{x:.2e}" for x in diffs) + " |")


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Overheads of the hf_sparse backend (1 thread, thread CPU time).")
    parser.add_argument("--sparsity", type=float, default=0.9)
    parser.add_argument("--pattern", default="4-block")
    parser.add_argument("--skip-bert", action="store_true", help="skip the BERT-base table (the rest takes seconds)")
    parser.add_argument(
        "--attention-error",
        action="store_true",
        help="only measure the bf16 attention's error against fp32 attention on BERT-base shapes (~1 min)",
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"isa {hf_sparse.ops.isa()}, torch {torch.__version__}, hf_sparse {hf_sparse.__version__}")
    if args.attention_error:
        print(f"attention kernel {hf_sparse.ops.attention_isa()}")
        _attention_error(args.sparsity, args.pattern)
        raise SystemExit(0)
    _per_call_overheads()
    _fixed_cost()
    if not args.skip_bert:
        _bert_base_split(args.sparsity, args.pattern)
