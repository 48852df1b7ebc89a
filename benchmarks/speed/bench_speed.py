"""End-to-end speed of a pruned BERT classifier: every engine on the same weights, in interleaved rounds.

    python benchmarks/speed/bench_speed.py                      # BERT-base, 80/90/97%, both patterns, batch 1+16
    python benchmarks/speed/bench_speed.py --sparsity 0.9 --pattern 4-block --engines torch_eager deepsparse_int8
    python benchmarks/speed/bench_speed.py --tiny --engines torch_eager --rounds 1 --sparsity 0.9 --batch 1
    python benchmarks/speed/bench_speed.py --profile ...        # also: where the time goes, per engine
    python benchmarks/speed/bench_speed.py --record "preliminary" ...   # write the tables into benchmarks/RESULTS.md

For each (sparsity, pattern) the script prunes one model, sets up every engine for every batch size, checks each
engine's logits against the torch fp32 logits, then runs `--rounds` rounds; in each round every (batch, engine)
pair is timed in turn, in a new random order, for about `--round-seconds`, so slow drifts of a shared machine hit
all engines alike. Only one engine computes at a time (DeepSparse's worker process waits on its pipe while the
others run). Ratios are speed-ups: reference median / engine median, > 1 = faster than the reference;
"vs DeepSparse" compares with the DeepSparse engine of the same precision (int8 engines with deepsparse_int8,
fp32 ones with deepsparse_fp32).
"""

from __future__ import annotations

import argparse
import contextlib
import faulthandler
import gc
import importlib
import importlib.util
import json
import logging
import os
import random
import re
import shlex
import sys
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch


HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import engines as engines_mod  # noqa: E402
import engines_hf_sparse  # noqa: E402, F401  (registers the hf_sparse.ops engines)
import results  # noqa: E402
from deepsparse_client import DeepSparseClient  # noqa: E402
from engines import ENGINES, EngineContext, EngineUnavailable, Runner  # noqa: E402
from models import MODEL_SIZES, build_model  # noqa: E402
from profile_torch import profile_module  # noqa: E402


logger = logging.getLogger("bench_speed")
DEEPSPARSE_FOR = {"fp32": "deepsparse_fp32", "int8": "deepsparse_int8"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=sorted(MODEL_SIZES), default="base", help="model size (default: BERT-base)")
    p.add_argument("--tiny", action="store_const", const="tiny", dest="size", help="same as --size tiny")
    p.add_argument("--sparsity", type=float, nargs="+", default=[0.8, 0.9, 0.97], help="fractions of zeros")
    p.add_argument("--pattern", nargs="+", default=["unstructured", "4-block"], help="hf_sparse patterns")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 16], help="batch sizes")
    p.add_argument("--engines", nargs="+", default=None, help="engines to time (default: all default engines)")
    p.add_argument("--extra-engines", nargs="+", default=[], metavar="MODULE_OR_FILE",
                   help="modules or .py files to import first; they register more engines")  # fmt: skip
    p.add_argument("--list-engines", action="store_true", help="print the registered engines and exit")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds")
    p.add_argument("--round-seconds", type=float, default=0.5, help="time per engine per round (sets iterations)")
    p.add_argument("--max-iters", type=int, default=50, help="cap on calls per engine per round")
    p.add_argument("--warmup", type=int, default=2, help="untimed calls after setup")
    p.add_argument("--gap-ms", type=float, default=20.0, help="pause between engines, so spinning threads settle")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--threads", type=int, default=2, help="torch / ORT intra-op threads and DeepSparse cores")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache-dir", type=Path, default=HERE.parent / ".cache", help="ONNX files, worker log")
    p.add_argument("--profile", action="store_true", help="also split each engine's time: linear/attention/other")
    p.add_argument("--profile-iters", type=int, default=10)
    p.add_argument("--record", metavar="LABEL", default=None, help="write the tables to RESULTS.md under LABEL")
    p.add_argument("--note", default="", help="a line written under the tables by --record")
    p.add_argument("--results-file", type=Path, default=HERE.parent / "RESULTS.md")
    p.add_argument("--json", type=Path, default=None, help="also write all measurements to this JSON file")
    p.add_argument("--from-json", type=Path, default=None, metavar="FILE",
                   help="measure nothing: print (and --record) the tables of an earlier --json run")  # fmt: skip
    args = p.parse_args(argv)

    for module in args.extra_engines:
        _import_engines(module)
    if args.list_engines:
        return args
    explicit = args.engines is not None
    args.engines = engines_mod.ordered(args.engines or engines_mod.default_engines())
    for name in args.engines:
        try:
            ENGINES.get(name)
        except ValueError as e:  # names the known engines
            p.error(str(e))
    args.explicit_engines = explicit
    for s in args.sparsity:
        if not 0.0 <= s < 1.0:
            p.error(f"--sparsity {s} must be in [0, 1)")
    for b in args.batch:
        if b < 1:
            p.error(f"--batch {b} must be >= 1")
    for name in ("rounds", "max_iters", "threads", "seq_len", "profile_iters"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    return args


def _import_engines(module: str) -> None:
    if module.endswith(".py"):
        path = Path(module).resolve()
        if not path.is_file():
            raise FileNotFoundError(f"--extra-engines file {module!r} does not exist")
        spec = importlib.util.spec_from_file_location(path.stem, path)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[path.stem] = mod
        spec.loader.exec_module(mod)
    else:
        importlib.import_module(module)


class DeepSparseHolder:
    """Starts the DeepSparse worker on first use and keeps it for the whole run."""

    def __init__(self, cache_dir: Path):
        self.cache_dir = cache_dir
        self.client: DeepSparseClient | None = None
        self.error: Exception | None = None

    def __call__(self) -> DeepSparseClient:
        if self.error is not None:
            raise EngineUnavailable(str(self.error))
        if self.client is None:
            try:
                self.client = DeepSparseClient(self.cache_dir / "deepsparse_worker.log")
            except Exception as e:
                self.error = e
                raise EngineUnavailable(str(e)) from e
            logger.info("DeepSparse worker: %s", self.client.info)
        return self.client

    def close(self) -> None:
        if self.client is not None:
            self.client.close()
            self.client = None


def _check_output(row: results.Row, out: np.ndarray, ref: np.ndarray) -> None:
    out = np.asarray(out, dtype=np.float32)
    if out.shape != ref.shape:
        raise RuntimeError(f"{row.engine} returned logits of shape {out.shape}, expected {ref.shape}")
    if not np.isfinite(out).all():
        raise RuntimeError(f"{row.engine} returned non-finite logits")
    row.max_abs_diff = float(np.abs(out - ref).max())
    row.label_agreement = float((out.argmax(-1) == ref.argmax(-1)).mean())


_DS_LINEAR = re.compile(r"/(query|key|value|dense)/(MatMul|Gemm)|^logits$")


def _summarize_deepsparse(analysis: dict) -> dict:
    """DeepSparse's per-layer times split like the torch profile.

    DeepSparse fuses ops into layers; a layer's `canonical_name` lists the ONNX outputs it computes. A layer that
    computes a Linear MatMul counts as linear (it may also hold that Linear's bias, residual add and LayerNorm);
    other layers under attention/self (QK^T, mask add, softmax, PV) as attention; the rest (embeddings, the mask,
    fallback "Naive Subgraph" steps) as other.
    """
    totals = {"linear": 0.0, "attention": 0.0, "other": 0.0}
    for layer in analysis["layers"]:
        outputs = layer["canonical_name"].split(",")
        if any(_DS_LINEAR.search(o) for o in outputs):
            totals["linear"] += layer["ms"]
        elif any("/attention/self/" in o for o in outputs):
            totals["attention"] += layer["ms"]
        else:
            totals["other"] += layer["ms"]
    return {
        "total_ms": analysis["average_total_ms"],
        **{f"{k}_ms": v for k, v in totals.items()},
        "overhead_ms": None,
        "note": "DeepSparse debug analysis (its Linear layers include the fused bias, residual add and LayerNorm)",
    }


def measure_config(args, sparsity: float, pattern: str, deepsparse: DeepSparseHolder):
    bench = build_model(args.size, sparsity, pattern, seq_len=args.seq_len, seed=args.seed)
    logger.info(
        "%s: measured sparsity %.4f (pruned in %.1f s), weights digest %s",
        bench.config_key,
        bench.measured_sparsity,
        bench.prune_s,
        bench.digest,
    )
    ctx = EngineContext(bench, args.threads, args.cache_dir, log=logger.info, deepsparse_factory=deepsparse)
    rows: dict[tuple[int, str], results.Row] = {}
    runners: dict[tuple[int, str], Runner] = {}
    iters: dict[tuple[int, str], int] = {}
    failed = False
    for batch in args.batch:
        ref = bench.reference(batch)
        for name in args.engines:
            spec = ENGINES.get(name)
            row = results.Row(sparsity, pattern, batch, name, spec.precision)
            start = time.perf_counter()
            runner = None
            try:
                runner = spec.setup(ctx, batch)
                _check_output(row, runner.run(), ref)
                warm = runner.time(args.warmup)
            except EngineUnavailable as e:
                if args.explicit_engines:
                    raise
                logger.warning("skipping %s: %s", name, e)
                continue
            except Exception as e:
                logger.error("%s at batch %d failed:\n%s", name, batch, traceback.format_exc())
                row.error = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                rows[batch, name] = row
                failed = True
                if runner is not None:
                    with contextlib.suppress(Exception):
                        runner.close()
                continue
            row.setup_s = time.perf_counter() - start
            row.info = _reportable(getattr(runner, "info", None))
            iters[batch, name] = max(1, min(args.max_iters, round(args.round_seconds / max(min(warm), 1e-6))))
            runners[batch, name] = runner
            rows[batch, name] = row
            logger.info(
                "%s b%d: set up in %.1f s, ~%.2f ms/call, %d calls per round, max |logit diff| %.2e",
                name,
                batch,
                row.setup_s,
                min(warm) * 1e3,
                iters[batch, name],
                row.max_abs_diff,
            )

    pairs = [(b, n) for b in args.batch for n in args.engines if (b, n) in runners]
    for r in range(args.rounds):
        # a new (seeded) order each round, so no engine always runs right after the same other one
        order = list(pairs)
        random.Random(args.seed * 7919 + r).shuffle(order)
        for batch, name in order:
            time.sleep(args.gap_ms / 1e3)
            rows[batch, name].times_ms += [t * 1e3 for t in runners[batch, name].time(iters[batch, name])]
        logger.info("round %d/%d done", r + 1, args.rounds)

    profiles = []
    if args.profile:
        for (batch, name), runner in runners.items():
            info = {"sparsity": sparsity, "pattern": pattern, "batch": batch, "engine": name}
            time.sleep(args.gap_ms / 1e3)
            if hasattr(runner, "profile"):  # an engine that knows better than forward hooks where its time goes
                profiles.append({**info, **runner.profile(args.profile_iters)})
            elif runner.module is not None:
                profiles.append({**info, **profile_module(runner.module, runner.run, iters=args.profile_iters)})
            elif hasattr(runner, "analyze"):
                profiles.append({**info, **_summarize_deepsparse(runner.analyze(args.profile_iters))})

    for runner in runners.values():
        runner.close()
    runners.clear()
    ctx.clear()
    del bench, ctx
    gc.collect()
    ordered_rows = [rows[b, n] for b in args.batch for n in args.engines if (b, n) in rows]
    return ordered_rows, profiles, failed


def _versions(args) -> dict[str, str]:
    import transformers

    import hf_sparse

    out = {"torch": torch.__version__, "transformers": transformers.__version__, "hf_sparse": hf_sparse.__version__}
    try:
        import onnxruntime

        out["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        pass
    out["threads"] = str(args.threads)
    return out


def main(argv: list[str] | None = None) -> int:
    faulthandler.enable()  # a crash in native code (an engine's kernels) still says where it happened
    # INFO for this script only: onnxruntime's quantizer logs every tensor at INFO
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s", datefmt="%H:%M:%S", stream=sys.stderr)
    logger.setLevel(logging.INFO)
    args = parse_args(argv)
    if args.list_engines:
        for name in engines_mod.ordered(list(ENGINES)):
            spec = ENGINES.get(name)
            print(f"{name:20s} {spec.precision:5s} {'' if spec.default else '(not default) '}{spec.help}")
        return 0
    if args.from_json:
        payload = json.loads(args.from_json.read_text())
        mtime = datetime.fromtimestamp(args.from_json.stat().st_mtime, timezone.utc)
        payload.setdefault("date", mtime.strftime("%Y-%m-%d %H:%M UTC"))
        failed = any(r.get("error") for r in payload["rows"])
    else:
        payload, failed = measure(args)
    rows = [results.Row(**{k: v for k, v in r.items() if k != "median_ms"}) for r in payload["rows"]]
    table = results.speed_table(rows, DEEPSPARSE_FOR)
    print("\nAll configurations (median ms; ratios = speed-up of the row's engine over the reference):")
    print(table)
    header = results.run_header(
        payload["command"], payload["versions"], commit=payload["commit"], cpu=payload["cpu"], when=payload["date"]
    )
    engines = results.engines_line(rows)
    body = [header + ("\n" + engines if engines else ""), "", table]
    if payload["profiles"]:
        ptable = results.profile_table(payload["profiles"])
        print("\nWhere the time goes (median ms per forward):")
        print(ptable)
        body += ["", "Where the time goes (median ms per forward; `--profile`):", "", ptable]
    if args.note:
        body += ["", args.note]
    if args.record:
        results.record(args.results_file, args.record, "\n".join(body))
        logger.info("recorded under %r in %s", args.record, args.results_file)
    if args.json and not args.from_json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(payload, indent=1, default=float))
    return 1 if failed else 0


def measure(args) -> tuple[dict, bool]:
    """Every configuration, engine and batch size of `args`: (the JSON payload of --json, whether any failed)."""
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    torch.set_num_threads(args.threads)
    deepsparse = DeepSparseHolder(args.cache_dir)
    all_rows, all_profiles, failed = [], [], False
    try:
        for sparsity in args.sparsity:
            for pattern in args.pattern:
                rows, profiles, bad = measure_config(args, sparsity, pattern, deepsparse)
                failed |= bad
                all_rows += rows
                all_profiles += profiles
                print(results.speed_table(rows, DEEPSPARSE_FOR), flush=True)
    finally:
        ds_info = deepsparse.client.info if deepsparse.client else None
        deepsparse.close()
    versions = _versions(args)
    if ds_info:
        versions["deepsparse"] = f"{ds_info['deepsparse']} (isa {ds_info['isa']}, vnni {ds_info['vnni']})"
    payload = {
        "date": when,
        "versions": versions,
        "cpu": results.cpu_description(),
        "commit": results.git_commit(),
        "command": _command(),
        "rows": [{**r.__dict__, "median_ms": r.median_ms} for r in all_rows],
        "profiles": all_profiles,
    }
    return payload, failed


def _reportable(info) -> dict:
    """The scalar entries of a runner's `info` (kernel set, threads, DeepSparse's supported-ops fraction...)."""
    if not isinstance(info, dict):
        return {}
    return {k: v for k, v in info.items() if isinstance(v, (str, int, float, bool))}


def _command() -> str:
    script = os.path.relpath(Path(__file__).resolve(), results.REPO)
    return shlex.join(["python", script, *sys.argv[1:]])


if __name__ == "__main__":
    sys.exit(main())
