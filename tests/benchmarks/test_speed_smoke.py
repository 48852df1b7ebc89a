"""The end-to-end speed harness (benchmarks/speed) still runs: a tiny BERT through the CLI, in subprocesses.

No timing is asserted (speed belongs in the benchmark's output, not in tests); what is checked is that every engine
runs, computes the same model as the torch fp32 reference, that the profile adds up, and that --record edits only
its own block of RESULTS.md. DeepSparse is not tested here: its venv does not exist in CI.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch


REPO = Path(__file__).resolve().parents[2]
SPEED = REPO / "benchmarks" / "speed"
SCRIPT = SPEED / "bench_speed.py"
HAS_ORT = all(importlib.util.find_spec(m) is not None for m in ("onnx", "onnxruntime"))


def _has_kernels() -> bool:
    try:
        import hf_sparse.ops
    except ImportError:
        return False
    return hf_sparse.ops.extension_available()


def _run(args: list[str], tmp_path: Path, timeout: int = 300) -> dict:
    out = tmp_path / "out.json"
    # 1 thread: CI's two cores may be busy with other work, and a 2-thread OpenMP region then stalls
    cmd = [sys.executable, str(SCRIPT), "--tiny", "--threads", "1", "--cache-dir", str(tmp_path / "cache")]
    proc = subprocess.run([*cmd, *args, "--json", str(out)], capture_output=True, text=True, timeout=timeout, cwd=REPO)
    assert proc.returncode == 0, f"bench_speed.py failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr[-4000:]}"
    return {**json.loads(out.read_text()), "stdout": proc.stdout}


def test_eager_smoke_and_record(tmp_path, bench_speed):
    results_file = tmp_path / "RESULTS.md"
    results_file.write_text("# Benchmark results\n\n## Someone else's section\n\nkeep me\n")
    args = ["--engines", "torch_eager", "--rounds", "1", "--sparsity", "0.9", "--batch", "1", "--pattern", "4-block"]
    out = _run([*args, "--record", "smoke", "--results-file", str(results_file)], tmp_path)

    (row,) = out["rows"]
    assert (row["engine"], row["batch"], row["sparsity"], row["pattern"]) == ("torch_eager", 1, 0.9, "4-block")
    assert row["median_ms"] > 0 and len(row["times_ms"]) >= 1
    assert row["max_abs_diff"] == 0.0 and row["label_agreement"] == 1.0  # it is the reference
    assert "| 0.9 | 4-block | 1 | torch_eager (fp32) |" in out["stdout"]

    text = results_file.read_text()
    assert text.startswith("# Benchmark results\n\n## Someone else's section\n\nkeep me\n")
    assert text.count("### smoke") == 1 and "torch_eager (fp32)" in text
    assert "ISA flags:" in text and "commit:" in text and "bench_speed.py --tiny" in text

    # --from-json records the same tables again, without measuring
    rc = bench_speed.main(["--from-json", str(tmp_path / "out.json"), "--record", "again", "--results-file",
                           str(results_file)])  # fmt: skip
    assert rc == 0
    text = results_file.read_text()
    smoke, again = text.split("### smoke")[1].split("### again")
    lines = [[ln for ln in block.splitlines() if ln.startswith(("| 0.9 |", "- command:"))] for block in (smoke, again)]
    assert len(lines[0]) == 2 and lines[0] == lines[1]


def test_torch_engines_agree_and_profile_adds_up(tmp_path):
    engines = ["torch_eager", "torch_onednn", "torch_dynamic_int8"]
    if HAS_ORT:
        engines += ["ort_fp32", "ort_dynamic_int8", "ort_qoperator_int8", "ort_qoperator_int8_attn"]
    kernels = ["hf_sparse_ops_fp32", "hf_sparse_ops_int8"] if _has_kernels() else []
    engines += kernels
    out = _run(
        ["--engines", *engines, "--rounds", "1", "--sparsity", "0.8", "--batch", "2", "--pattern", "unstructured",
         "--round-seconds", "0.05", "--profile", "--profile-iters", "2"],
        tmp_path,
    )  # fmt: skip
    rows = {r["engine"]: r for r in out["rows"]}
    assert sorted(rows) == sorted(engines)
    for name, row in rows.items():
        assert not row["error"], f"{name}: {row['error']}"
        assert row["median_ms"] > 0
        assert row["label_agreement"] == 1.0, name
    # same weights: fp32 engines match the reference to float rounding; int8 ones are close but not exact
    assert rows["torch_onednn"]["max_abs_diff"] < 1e-4
    assert 0 < rows["torch_dynamic_int8"]["max_abs_diff"] < 0.05
    if HAS_ORT:
        assert rows["ort_fp32"]["max_abs_diff"] < 1e-4
        assert 0 < rows["ort_dynamic_int8"]["max_abs_diff"] < 0.05
        assert 0 < rows["ort_qoperator_int8"]["max_abs_diff"] < 0.05
        # DeepSparse's int8-attention file (its exporter checks that attention became QLinearMatMul)
        assert 0 < rows["ort_qoperator_int8_attn"]["max_abs_diff"] < 0.05
    if kernels:
        assert rows["hf_sparse_ops_fp32"]["max_abs_diff"] < 1e-4
        assert 0 < rows["hf_sparse_ops_int8"]["max_abs_diff"] < 0.05

    profiles = {p["engine"]: p for p in out["profiles"]}
    # ORT has no torch module to profile
    assert sorted(profiles) == sorted(["torch_dynamic_int8", "torch_eager", "torch_onednn", *kernels])
    for name, p in profiles.items():
        # tiny BERT: 2 layers x 6 encoder Linears + pooler + classifier; one self-attention per layer
        assert p["modules"] == {"linear": 14, "attention": 2, "other": 0}, name
        assert p["linear_ms"] > 0 and p["attention_ms"] > 0 and p["other_ms"] > 0, name
        assert p["total_ms"] == pytest.approx(p["linear_ms"] + p["attention_ms"] + p["other_ms"])


@pytest.mark.skipif(not _has_kernels(), reason="the hf_sparse C++ extension is not built")
def test_from_pretrained_engine_profiles_its_fused_layers(tmp_path):
    # forward hooks would switch the fused encoder layers off: the engine times their kernel calls itself;
    # hf_sparse_int8_fp32attn runs the same model without them (fp32 attention), profiled by forward hooks;
    # hf_sparse_int8_attn runs them with int8 attention, interleaved with the others on the process-wide switch
    engines = ["hf_sparse_int8", "hf_sparse_int8_fp32attn", "hf_sparse_int8_attn"]
    out = _run(
        ["--extra-engines", str(SPEED / "engine_from_pretrained.py"), "--engines", "torch_eager", *engines,
         "--rounds", "1", "--sparsity", "0.9", "--batch", "2", "--pattern", "4-block", "--round-seconds", "0.05",
         "--profile", "--profile-iters", "2"],
        tmp_path,
    )  # fmt: skip
    rows = {r["engine"]: r for r in out["rows"]}
    profiles = {p["engine"]: p for p in out["profiles"]}
    for name in engines:
        assert not rows[name]["error"] and rows[name]["label_agreement"] == 1.0, name
        assert 0 < rows[name]["max_abs_diff"] < 0.05, name
        p = profiles[name]
        assert p["linear_ms"] > 0 and p["attention_ms"] > 0 and p["other_ms"] > 0, name
        assert p["total_ms"] == pytest.approx(p["linear_ms"] + p["attention_ms"] + p["other_ms"])
    assert profiles["hf_sparse_int8"]["note"].startswith("fused encoder layers")
    assert profiles["hf_sparse_int8_attn"]["note"].startswith("fused encoder layers")
    # fp32 attention: the layers' own forward ran, so hooks saw both self-attention modules
    assert "note" not in profiles["hf_sparse_int8_fp32attn"]
    assert profiles["hf_sparse_int8_fp32attn"]["modules"]["attention"] == 2
    # each engine says what it ran on
    assert rows["hf_sparse_int8"]["info"]["attention_precision"] == "bf16"
    assert rows["hf_sparse_int8_fp32attn"]["info"]["attention_precision"] == "fp32"
    assert rows["hf_sparse_int8_attn"]["info"]["attention_precision"] == "int8"
    assert rows["hf_sparse_int8_attn"]["info"]["attention_kernel"].endswith("_int8")  # avx512_vnni_int8 / scalar_int8
    assert rows["hf_sparse_int8_fp32attn"]["info"]["attention_kernel"] == "torch"


@pytest.fixture
def bench_speed():
    """benchmarks/speed/bench_speed.py imported in this process, its flat module names removed again afterwards."""
    names = [
        "models",
        "onnx_models",
        "deepsparse_client",
        "engines",
        "engines_hf_sparse",
        "results",
        "profile_torch",
        "bench_speed",
        "engine_from_pretrained",
    ]
    saved = {n: sys.modules.pop(n) for n in names if n in sys.modules}
    path = list(sys.path)
    sys.path.insert(0, str(SPEED))
    try:
        yield importlib.import_module("bench_speed")
    finally:
        for n in names:
            sys.modules.pop(n, None)
        sys.modules.update(saved)
        sys.path[:] = path


def test_from_pretrained_runners_each_run_on_their_own_attention_precision(bench_speed):
    # the precision is process-wide and the engines run interleaved: each runner sets its own around its calls
    import types

    import engine_from_pretrained

    import hf_sparse.ops

    codes = {"bf16": 0.0, "int8": 1.0, "fp32": 2.0}

    class Probe(torch.nn.Module):
        def forward(self):
            return types.SimpleNamespace(logits=torch.tensor([[codes[hf_sparse.ops.attention_precision()]]]))

    runners = {a: engine_from_pretrained.FromPretrainedRunner(Probe(), {}, attention=a) for a in ("int8", "fp32")}
    runners["bf16"] = engine_from_pretrained.FromPretrainedRunner(Probe(), {})  # hf_sparse_int8's default
    previous = hf_sparse.ops.set_attention_precision("int8")  # whatever was in force is not inherited
    try:
        for name in ("int8", "bf16", "fp32", "bf16", "int8"):
            assert runners[name].run()[0, 0] == codes[name], name
        assert hf_sparse.ops.attention_precision() == "int8"  # restored after each call
    finally:
        hf_sparse.ops.set_attention_precision(previous)


def test_record_replaces_only_its_own_block(bench_speed, tmp_path):
    results_file = tmp_path / "RESULTS.md"
    results_file.write_text("# Benchmark results\n\n## Someone else's section\n\nkeep me\n")
    bench_speed.results.record(results_file, "run A", "first")
    bench_speed.results.record(results_file, "run B", "second")
    bench_speed.results.record(results_file, "run A", "third")
    text = results_file.read_text()
    assert text.startswith("# Benchmark results\n\n## Someone else's section\n\nkeep me\n")
    assert text.count("### run A") == 1 and text.count("### run B") == 1
    assert "third" in text and "second" in text and "first" not in text
    assert text.index("### run A") < text.index("### run B")  # replaced in place
    with pytest.raises(ValueError, match="one non-empty line"):
        bench_speed.results.record(results_file, "two\nlines", "x")


def test_bad_arguments_are_refused(bench_speed, capsys):
    with pytest.raises(SystemExit):
        bench_speed.parse_args(["--engines", "torch_eagre"])
    err = capsys.readouterr().err
    assert "Unknown engine --engines='torch_eagre'" in err and "torch_eager" in err
    with pytest.raises(SystemExit):
        bench_speed.parse_args(["--sparsity", "1.0"])
    assert "--sparsity 1.0 must be in [0, 1)" in capsys.readouterr().err


def test_missing_deepsparse_venv_says_how_to_fix(bench_speed, tmp_path):
    client_mod = sys.modules["deepsparse_client"]
    with pytest.raises(client_mod.DeepSparseUnavailable, match="DeepSparse venv not found.*setup_deepsparse.sh"):
        client_mod.DeepSparseClient(tmp_path / "worker.log", venv=tmp_path / "no-venv")


def test_deepsparse_analysis_split(bench_speed):
    # layer records as DeepSparse 1.8.0's debug analysis reports them (names from a real BERT run)
    layer = "/bert/encoder/layer.0"
    layers = [
        ("gather_0", "<none>", 0.1, 0.0),
        ("pyramid_3", f"{layer}/attention/self/key/MatMul_output_0_quantized,{layer}/attention/self/key/Add_output_0",
         1.0, 0.0),
        ("pyramid_5", f"{layer}/attention/self/MatMul_output_0,{layer}/attention/self/Softmax_output_0", 0.5, 0.0),
        ("pyramid_6", f"{layer}/attention/self/MatMul_1_output_0_pre_q", 0.25, 0.0),
        ("ks_gemm_hyb-89.8%_4", f"{layer}/intermediate/dense/MatMul_output_0", 2.0, 0.9),
        ("pyramid_7", f"{layer}/output/dense/MatMul_output_0_quantized,{layer}/output/LayerNorm/Add_1_output_0",
         1.5, 0.0),
        ("Naive Subgraph 1", "<none>", 0.05, 0.0),
        ("where_0", "<none>", 0.02, 0.0),
        ("gemm_7", "logits", 0.01, 0.0),
    ]  # fmt: skip
    analysis = {
        "average_total_ms": sum(x[2] for x in layers),
        "layers": [{"name": n, "canonical_name": c, "ms": ms, "kernel_sparsity": ks} for n, c, ms, ks in layers],
    }
    out = bench_speed._summarize_deepsparse(analysis)
    assert out["linear_ms"] == pytest.approx(1.0 + 2.0 + 1.5 + 0.01)
    assert out["attention_ms"] == pytest.approx(0.75)
    assert out["other_ms"] == pytest.approx(0.17)
    assert out["total_ms"] == pytest.approx(out["linear_ms"] + out["attention_ms"] + out["other_ms"])


def test_registering_an_engine_is_one_function(bench_speed):
    engines = bench_speed.engines_mod

    @engines.register_engine("test_double_eager", precision="fp32", help="eager, registered by a test", default=False)
    def _(ctx, batch):
        return engines.TorchRunner(ctx.bench.model, ctx.bench.inputs(batch))

    assert "test_double_eager" in engines.ENGINES and "test_double_eager" not in engines.default_engines()
    bench = bench_speed.build_model("tiny", 0.5, "unstructured", seq_len=16)
    ctx = engines.EngineContext(bench, threads=1, cache_root=Path("/nonexistent"))
    runner = engines.ENGINES.get("test_double_eager").setup(ctx, 3)
    assert runner.run().shape == (3, 2) and len(runner.time(2)) == 2
    assert runner.run() == pytest.approx(bench.reference(3))


def test_recorded_header_names_what_each_engine_ran_on(bench_speed):
    import results

    rows = [
        results.Row(0.9, "4-block", 1, "hf_sparse_int8", "int8", info={"isa": "avx512_vnni", "threads": "openmp"}),
        results.Row(0.9, "4-block", 16, "hf_sparse_int8", "int8", info={"isa": "avx512_vnni", "threads": "openmp"}),
        results.Row(0.9, "4-block", 1, "torch_eager", "fp32"),
        results.Row(0.9, "4-block", 1, "deepsparse_int8", "int8", info={"fraction_of_supported_ops": 1.0}),
    ]
    assert results.engines_line(rows) == (
        "- engines: hf_sparse_int8 (isa avx512_vnni, threads openmp); deepsparse_int8 (fraction_of_supported_ops 1.0)"
    )
    assert results.engines_line(rows[2:3]) == ""
