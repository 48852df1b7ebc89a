"""The engine registry: each engine is a name, a precision and `setup(ctx, batch) -> Runner`.

Adding an engine (the hf_sparse backend, for instance) is one decorated function, here or in any module imported
before the run:

    @register_engine("hf_sparse_int8", precision="int8", help="hf_sparse sparse int8 kernels")
    def _(ctx: EngineContext, batch: int) -> Runner:
        model = ctx.memo("hf_sparse_int8", lambda: convert_with_hf_sparse(copy.deepcopy(ctx.bench.model)))
        return TorchRunner(model, ctx.bench.inputs(batch))

`ctx.bench.model` is the pruned fp32 torch model every engine starts from (do not modify it in place: copy it);
`ctx.bench.inputs(batch)` are the fixed inputs; a Runner returns the logits as numpy and times calls. A
TorchRunner exposes `.module`, so `--profile` splits its time into Linear / attention / other.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx_models
import torch
from deepsparse_client import DeepSparseClient
from models import BenchModel
from torch import nn

from hf_sparse.utils import Registry


class EngineUnavailable(RuntimeError):
    """The engine cannot run in this environment (missing package or venv); the message says how to fix it."""


class Runner:
    """One engine set up for one batch size."""

    module: nn.Module | None = None  # the torch module called by run(), for --profile
    info: dict

    def run(self) -> np.ndarray:
        """One forward on the fixed inputs; returns the logits (batch, num_labels) as float32 numpy."""
        raise NotImplementedError

    def time(self, iters: int) -> list[float]:
        """Seconds taken by each of `iters` back-to-back calls."""
        times = []
        for _ in range(iters):
            start = time.perf_counter()
            self.run()
            times.append(time.perf_counter() - start)
        return times

    def close(self) -> None:
        pass


class TorchRunner(Runner):
    def __init__(self, module: nn.Module, inputs: dict[str, torch.Tensor], **info):
        self.module = module
        self.inputs = inputs
        self.info = info

    def run(self) -> np.ndarray:
        with torch.inference_mode():
            return self.module(**self.inputs).logits.float().numpy()


class OrtRunner(Runner):
    def __init__(self, session, inputs: dict[str, np.ndarray], **info):
        self.session = session
        names = [i.name for i in session.get_inputs()]
        self.inputs = {name: inputs[name] for name in names}  # the export may drop unused inputs
        self.info = info

    def run(self) -> np.ndarray:
        return self.session.run(["logits"], self.inputs)[0]


class DeepSparseRunner(Runner):
    def __init__(self, client: DeepSparseClient, key: str, onnx_path: Path, batch: int, inputs, cores: int):
        self.client, self.key = client, key
        self.info = client.load(key, onnx_path, batch, inputs, cores)
        self.onnx_path, self.batch, self.cores = onnx_path, batch, cores

    def run(self) -> np.ndarray:
        return np.asarray(self.client.request("run", key=self.key)["outputs"], dtype=np.float32)

    def time(self, iters: int) -> list[float]:
        return self.client.request("time", key=self.key, iters=iters)["times"]

    def analyze(self, iters: int) -> dict:
        return self.client.request(
            "analyze", key=self.key, path=str(self.onnx_path), batch=self.batch, cores=self.cores, iters=iters
        )

    def close(self) -> None:
        self.client.request("unload", key=self.key)


@dataclass
class EngineContext:
    """What setup functions get: the pruned model and shared, lazily built resources."""

    bench: BenchModel
    threads: int
    cache_root: Path
    log: Callable[[str], None] = print
    deepsparse_factory: Callable[[], DeepSparseClient] | None = None
    _memo: dict = field(default_factory=dict, repr=False)

    def memo(self, key: str, build: Callable[[], object]):
        """Build once per model (e.g. a quantized copy), shared by the runners of every batch size."""
        if key not in self._memo:
            self._memo[key] = build()
        return self._memo[key]

    def onnx(self, kind: str) -> Path:
        exporters = {
            "fp32": onnx_models.export_fp32,
            "ort_int8": onnx_models.export_ort_dynamic_int8,
            "qop_int8": onnx_models.export_qoperator_int8,
            "qop_int8_attn": onnx_models.export_qoperator_int8_attention,
        }
        return self.memo(f"onnx:{kind}", lambda: exporters[kind](self.bench, self.cache_root, self.log))

    def deepsparse(self) -> DeepSparseClient:
        if self.deepsparse_factory is None:
            raise EngineUnavailable("no DeepSparse worker configured for this run")
        return self.deepsparse_factory()

    def clear(self) -> None:
        self._memo.clear()


@dataclass(frozen=True)
class EngineSpec:
    name: str
    precision: str  # "fp32" or "int8": the DeepSparse engine of the same precision is the ratio reference
    setup: Callable[[EngineContext, int], Runner]
    help: str
    default: bool = True  # part of the default --engines list


ENGINES: Registry[EngineSpec] = Registry("engine", field="--engines")


def register_engine(name: str, *, precision: str, help: str, default: bool = True):
    if precision not in ("fp32", "int8"):
        raise ValueError(f"engine {name!r}: precision must be 'fp32' or 'int8', got {precision!r}")

    def decorator(setup: Callable[[EngineContext, int], Runner]):
        ENGINES.register(name)(EngineSpec(name, precision, setup, help, default))
        return setup

    return decorator


def default_engines() -> list[str]:
    return ordered([name for name in ENGINES if ENGINES.get(name).default])


# ---- PyTorch ----------------------------------------------------------------------------------------------------
@register_engine("torch_eager", precision="fp32", help="PyTorch eager fp32 (transformers' default SDPA attention)")
def _torch_eager(ctx: EngineContext, batch: int) -> Runner:
    return TorchRunner(ctx.bench.model, ctx.bench.inputs(batch))


def _to_onednn(model: nn.Module) -> nn.Module:
    from torch.utils.mkldnn import to_mkldnn

    # to_mkldnn swaps nn.Linear for MkldnnLinear (weights held as oneDNN tensors, torch._C._nn.mkldnn_linear)
    # in place, so it gets a copy
    return to_mkldnn(copy.deepcopy(model)).eval()


@register_engine(
    "torch_onednn",
    precision="fp32",
    help="PyTorch fp32 with every nn.Linear through oneDNN (torch.utils.mkldnn.to_mkldnn), the rest eager",
)
def _torch_onednn(ctx: EngineContext, batch: int) -> Runner:
    return TorchRunner(ctx.memo("torch_onednn", lambda: _to_onednn(ctx.bench.model)), ctx.bench.inputs(batch))


def _to_dynamic_int8(model: nn.Module) -> nn.Module:
    from torch.ao.quantization import quantize_dynamic

    return quantize_dynamic(copy.deepcopy(model), {nn.Linear}, dtype=torch.qint8).eval()


@register_engine(
    "torch_dynamic_int8",
    precision="int8",
    help="PyTorch dynamic int8 (torch.ao.quantization.quantize_dynamic on every nn.Linear)",
)
def _torch_dynamic_int8(ctx: EngineContext, batch: int) -> Runner:
    model = ctx.memo("torch_dynamic_int8", lambda: _to_dynamic_int8(ctx.bench.model))
    return TorchRunner(model, ctx.bench.inputs(batch), quantized_engine=torch.backends.quantized.engine)


# ---- ONNX Runtime -----------------------------------------------------------------------------------------------
def _ort_session(path: Path, threads: int):
    try:
        import onnxruntime as ort
    except ImportError as e:
        raise EngineUnavailable("onnxruntime is not installed: pip install 'hf-sparse[bench]'") from e
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _ort_runner(ctx: EngineContext, kind: str, batch: int) -> Runner:
    try:
        import onnx  # noqa: F401  (the exporters need it)
    except ImportError as e:
        raise EngineUnavailable("onnx is not installed: pip install 'hf-sparse[bench]'") from e
    session = ctx.memo(f"ort:{kind}", lambda: _ort_session(ctx.onnx(kind), ctx.threads))
    return OrtRunner(session, ctx.bench.numpy_inputs(batch), onnx=str(ctx.onnx(kind)))


@register_engine("ort_fp32", precision="fp32", help="ONNX Runtime fp32 (torch.onnx.export, opset 14)")
def _ort_fp32(ctx: EngineContext, batch: int) -> Runner:
    return _ort_runner(ctx, "fp32", batch)


@register_engine(
    "ort_dynamic_int8",
    precision="int8",
    help="ONNX Runtime dynamic int8 (onnxruntime.quantization.quantize_dynamic on the Linear MatMuls)",
)
def _ort_dynamic_int8(ctx: EngineContext, batch: int) -> Runner:
    return _ort_runner(ctx, "ort_int8", batch)


@register_engine(
    "ort_qoperator_int8",
    precision="int8",
    help="ONNX Runtime on DeepSparse's int8 file (static QOperator QLinearMatMul): checks that file",
    default=False,
)
def _ort_qoperator_int8(ctx: EngineContext, batch: int) -> Runner:
    return _ort_runner(ctx, "qop_int8", batch)


@register_engine(
    "ort_qoperator_int8_attn",
    precision="int8",
    help="ONNX Runtime on deepsparse_int8_attn's file (attention MatMuls also QLinearMatMul): checks that file",
    default=False,
)
def _ort_qoperator_int8_attn(ctx: EngineContext, batch: int) -> Runner:
    return _ort_runner(ctx, "qop_int8_attn", batch)


# ---- DeepSparse (its own venv and process) ----------------------------------------------------------------------
def _deepsparse_runner(ctx: EngineContext, kind: str, batch: int) -> Runner:
    client = ctx.deepsparse()
    path = ctx.onnx(kind)
    key = f"{ctx.bench.config_key}:{kind}:b{batch}"
    return DeepSparseRunner(client, key, path, batch, ctx.bench.numpy_inputs(batch), ctx.threads)


@register_engine("deepsparse_fp32", precision="fp32", help="DeepSparse 1.8.0 on the fp32 ONNX file")
def _deepsparse_fp32(ctx: EngineContext, batch: int) -> Runner:
    return _deepsparse_runner(ctx, "fp32", batch)


@register_engine(
    "deepsparse_int8",
    precision="int8",
    help="DeepSparse 1.8.0 on the static int8 QOperator ONNX file (QLinearMatMul on the Linear layers)",
)
def _deepsparse_int8(ctx: EngineContext, batch: int) -> Runner:
    return _deepsparse_runner(ctx, "qop_int8", batch)


@register_engine(
    "deepsparse_int8_attn",
    precision="int8",
    help="DeepSparse 1.8.0 on the static int8 QOperator file with attention's Q K^T and P V also QLinearMatMul "
    "(int8 attention, as in SparseML's quantized BERTs)",
    default=False,
)
def _deepsparse_int8_attn(ctx: EngineContext, batch: int) -> Runner:
    return _deepsparse_runner(ctx, "qop_int8_attn", batch)


# display order (the registry itself is sorted by name)
ENGINES_ORDER = [
    "torch_eager",
    "torch_onednn",
    "torch_dynamic_int8",
    "ort_fp32",
    "ort_dynamic_int8",
    "ort_qoperator_int8",
    "ort_qoperator_int8_attn",
    "deepsparse_fp32",
    "deepsparse_int8",
    "deepsparse_int8_attn",
    "hf_sparse_ops_fp32",
    "hf_sparse_ops_int8",
]


def ordered(names: list[str]) -> list[str]:
    """Known engines in display order first, engines registered elsewhere after them."""
    rank = {name: i for i, name in enumerate(ENGINES_ORDER)}
    return sorted(dict.fromkeys(names), key=lambda n: rank.get(n, len(rank)))
