"""ONNX files of a BenchModel, cached under benchmarks/.cache/onnx/<config>-<weights digest>/.

- fp32: `torch.onnx.export(..., dynamo=False, opset_version=14)` of the pruned model (a dense graph whose weights
  hold the zeros), dynamic batch axis, fixed sequence length. Exported with transformers' "eager" attention (the
  same function as SDPA): the classic MatMul/Softmax/MatMul graph that DeepSparse and ORT's attention fusion know;
  the SDPA symbolic adds IsNaN/Where guards that DeepSparse runs in a slow fallback subgraph.
- ort_int8: `onnxruntime.quantization.quantize_dynamic` of that file, restricted to the Linear MatMuls (the same
  layers the other int8 engines quantize), int8 weights, u8 activations quantized at run time.
- qop_int8: `quantize_static(..., quant_format=QuantFormat.QOperator)` on the Linear MatMuls with a few calibration
  batches: QLinearMatMul nodes, the layout DeepSparse accelerates (with ORT's default QDQ output DeepSparse falls
  back to slow paths; see RESEARCH.md section 5). Symmetric int8 weights, so pruned weights stay exact zeros.
- qop_int8_attn: qop_int8 with each layer's two attention MatMuls (Q K^T and P V) also QLinearMatMul, on u8
  activations with calibrated static scales: the int8 attention of SparseML's quantized BERTs, the models
  DeepSparse's own published benchmarks run.
"""

from __future__ import annotations

import contextlib
import copy
import os
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from models import INPUT_NAMES, BenchModel


OPSET = 14
# bump when the way a file is produced changes, so stale cache entries are not reused
EXPORT_VERSION = 2
CALIBRATION_BATCHES = 4
CALIBRATION_BATCH_SIZE = 4


def cache_dir_for(bench: BenchModel, cache_root: Path) -> Path:
    return cache_root / "onnx" / f"{bench.config_key}-{bench.digest}-v{EXPORT_VERSION}"


@contextlib.contextmanager
def _atomic_path(path: Path):
    """A temporary path beside `path` that replaces it on success (no half-written model in the cache)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp.onnx", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def _cached(path: Path, build: Callable[[Path], None], log: Callable[[str], None]) -> Path:
    if path.is_file():
        return path
    start = time.perf_counter()
    with _atomic_path(path) as tmp:
        build(tmp)
    log(f"wrote {path} in {time.perf_counter() - start:.1f} s")
    return path


def _matmuls(model_path: Path, kind: str, keep: Callable[[list[bool]], bool]) -> list[str]:
    """Names of the MatMul nodes whose weight flags (per input: is it an initializer) pass `keep`."""
    import onnx

    graph = onnx.load(str(model_path), load_external_data=False).graph
    weights = {init.name for init in graph.initializer}
    names = [n.name for n in graph.node if n.op_type == "MatMul" and keep([i in weights for i in n.input])]
    if not names:
        raise RuntimeError(f"{model_path}: found no {kind}; the export layout changed")
    return names


def linear_matmuls(model_path: Path) -> list[str]:
    """The MatMuls whose second input is a weight: the Linear layers, not attention."""
    return _matmuls(model_path, "MatMul with a weight initializer", lambda is_weight: is_weight[1])


def attention_matmuls(model_path: Path) -> list[str]:
    """The MatMuls of two activations: attention's Q K^T and P V."""
    return _matmuls(model_path, "MatMul of two activations", lambda is_weight: not any(is_weight))


def export_fp32(bench: BenchModel, cache_root: Path, log: Callable[[str], None] = print) -> Path:
    def build(tmp: Path) -> None:
        inputs = bench.inputs(1)
        model = copy.deepcopy(bench.model)
        model.set_attn_implementation("eager")
        with warnings.catch_warnings(), torch.inference_mode():
            warnings.simplefilter("ignore")  # tracer warnings about Python control flow, all benign here
            torch.onnx.export(
                model,
                tuple(inputs[name] for name in INPUT_NAMES),
                str(tmp),
                input_names=list(INPUT_NAMES),
                output_names=["logits"],
                dynamic_axes={name: {0: "batch"} for name in (*INPUT_NAMES, "logits")},
                opset_version=OPSET,
                do_constant_folding=True,
                dynamo=False,
            )

    return _cached(cache_dir_for(bench, cache_root) / "model_fp32.onnx", build, log)


def export_ort_dynamic_int8(bench: BenchModel, cache_root: Path, log: Callable[[str], None] = print) -> Path:
    fp32 = export_fp32(bench, cache_root, log)

    def build(tmp: Path) -> None:
        from onnxruntime.quantization import QuantType, quantize_dynamic

        quantize_dynamic(
            str(fp32),
            str(tmp),
            weight_type=QuantType.QInt8,
            op_types_to_quantize=["MatMul"],
            nodes_to_quantize=linear_matmuls(fp32),
        )

    return _cached(fp32.with_name("model_ort_dynamic_int8.onnx"), build, log)


class _CalibrationReader:
    """A few batches of random token ids (same distribution as the benchmark inputs) for static calibration."""

    def __init__(self, bench: BenchModel):
        gen = np.random.default_rng(bench.seed + 12345)
        vocab = bench.model.config.vocab_size
        self._batches = []
        for _ in range(CALIBRATION_BATCHES):
            ids = gen.integers(0, vocab, (CALIBRATION_BATCH_SIZE, bench.seq_len), dtype=np.int64)
            self._batches.append({"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": 0 * ids})
        self._iter = iter(self._batches)

    def get_next(self):
        return next(self._iter, None)

    def rewind(self):
        self._iter = iter(self._batches)


def _quantize_static(bench: BenchModel, fp32: Path, out: Path, nodes: list[str]) -> None:
    """QOperator static int8 of the MatMul nodes `nodes`; raises unless every one of them became a QLinearMatMul."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    quantize_static(
        str(fp32),
        str(out),
        _CalibrationReader(bench),
        quant_format=QuantFormat.QOperator,
        op_types_to_quantize=["MatMul"],
        nodes_to_quantize=nodes,
        per_channel=False,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        calibrate_method=CalibrationMethod.MinMax,
        extra_options={"WeightSymmetric": True, "ActivationSymmetric": False},
    )
    # a node the quantizer cannot quantize is left float, without an error
    graph = onnx.load(str(out), load_external_data=False).graph
    left = sorted(set(nodes).intersection(n.name for n in graph.node if n.op_type == "MatMul"))
    quantized = sum(n.op_type == "QLinearMatMul" for n in graph.node)
    if left or quantized != len(nodes):
        raise RuntimeError(
            f"{fp32}: quantize_static wrote {quantized} QLinearMatMul nodes for the {len(nodes)} MatMuls asked for; "
            f"{len(left)} left float: {left[:3]}"
        )


def export_qoperator_int8(bench: BenchModel, cache_root: Path, log: Callable[[str], None] = print) -> Path:
    fp32 = export_fp32(bench, cache_root, log)

    def build(tmp: Path) -> None:
        _quantize_static(bench, fp32, tmp, linear_matmuls(fp32))

    return _cached(fp32.with_name("model_qoperator_int8.onnx"), build, log)


def export_qoperator_int8_attention(bench: BenchModel, cache_root: Path, log: Callable[[str], None] = print) -> Path:
    fp32 = export_fp32(bench, cache_root, log)

    def build(tmp: Path) -> None:
        _quantize_static(bench, fp32, tmp, linear_matmuls(fp32) + attention_matmuls(fp32))

    return _cached(fp32.with_name("model_qoperator_int8_attn.onnx"), build, log)
