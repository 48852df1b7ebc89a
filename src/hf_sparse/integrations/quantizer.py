"""The transformers backend: `quant_method: "hf_sparse"` checkpoints load through `from_pretrained` onto the kernels.

`import hf_sparse` calls `register()`, which registers `HfSparseConfig` and `HfSparseQuantizer` under "hf_sparse".
from_pretrained then (1) opens the checkpoint's files and checks them (`SparseCheckpoint`: config block, metadata,
checksum lists, tensor sets), (2) swaps the converted modules on the meta device (`module_swap.replace_modules`),
(3) loads the weights: `SparseDeserialize` receives each module's on-disk tensors, checks their checksums and
format (`hf_sparse.export.validate`) and decodes them to the dense stored matrix (int8 codes + scales, or float
values), and (4) packs everything for the kernels (`module_swap.pack_model`), freeing the dense copies.

transformers turns an error inside a weight conversion into a generic RuntimeError (the message goes to the log);
so checkpoint errors are recorded here and raised after loading, as the export module's own `CheckpointError`.
"""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path
from typing import Any

import torch
from transformers.core_model_loading import ConversionOps
from transformers.quantizers import HfQuantizer, register_quantization_config, register_quantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from ..export import CheckpointError, SparseCheckpoint, SparseQuantizationConfig, validate
from ..export.config import QUANT_METHOD
from ..export.formats import FORMATS
from ..export.save import CHECKSUMS_KEY, METADATA_KEY, WEIGHTS_INDEX_NAME, WEIGHTS_NAME, tensor_sha256
from ..ops import extension_available
from .module_swap import compressed_state_dict, dequantize_model, model_workload, pack_model, replace_modules


logger = logging.getLogger(__name__)


class HfSparseConfig(QuantizationConfigMixin):
    """`quantization_config` of an hf_sparse checkpoint as transformers holds it: every key of the config.json
    block is passed in, checked by `hf_sparse.export.SparseQuantizationConfig` (held as `.sparse`), and written back
    unchanged by `to_dict()`. Checkpoints carry it; there is nothing to set by hand."""

    def __init__(self, **block: Any):
        self.quant_method = QUANT_METHOD
        self.sparse = SparseQuantizationConfig.from_dict({"quant_method": QUANT_METHOD, **block})

    def to_dict(self) -> dict[str, Any]:
        return self.sparse.to_dict()

    def __iter__(self):
        yield from self.to_dict().items()


class _Identity(ConversionOps):
    """Saving reverts the load conversions; the saved tensors already have their on-disk names and layout."""

    def convert(self, input_dict, **kwargs):
        return input_dict


class SparseDeserialize(ConversionOps):
    """Load operation: one module's on-disk tensors -> its loading parameters (see `HfSparseQuantizer.deserialize`)."""

    def __init__(self, hf_quantizer: HfSparseQuantizer):
        self.hf_quantizer = hf_quantizer

    def __deepcopy__(self, memo):
        # transformers deep-copies the converter for every module; all copies must report to the one quantizer
        return type(self)(self.hf_quantizer)

    def convert(self, input_dict, full_layer_name=None, model=None, missing_keys=None, **kwargs):
        return self.hf_quantizer.deserialize(input_dict, full_layer_name, model, missing_keys)

    @property
    def reverse_op(self) -> ConversionOps:
        return _Identity()


class HfSparseQuantizer(HfQuantizer):
    """Loads hf_sparse checkpoints (written by `save_sparse`) onto hf_sparse's CPU kernels. Inference only."""

    requires_calibration = True  # checkpoints only: nothing is pruned or quantized on the fly
    # "weight" first: saving renames a module's weight to the first name, i.e. leaves it as it is
    serialized_names = {
        "weight": ["weight", "weight_scale", *sorted({n for f in FORMATS for n in FORMATS.get(f).names} - {"weight"})]
    }

    def __init__(self, quantization_config: HfSparseConfig, **kwargs):
        if not kwargs.get("pre_quantized", True):
            raise ValueError(
                "hf_sparse loads checkpoints written by hf_sparse.save_sparse; it does not quantize a dense model on "
                "the fly. Prune the model (hf_sparse.sparsify_), save it with save_sparse, then load that folder."
            )
        super().__init__(quantization_config, **kwargs)
        self.modules: dict[str, str] = {}  # model module name -> checkpoint module name
        self.checkpoint: SparseCheckpoint | None = None  # the folder's files, checked; holds the checksums
        self.loaded: set[str] = set()
        self.errors: list[CheckpointError] = []

    @property
    def sparse(self) -> SparseQuantizationConfig:
        return self.quantization_config.sparse

    # ---- before loading -------------------------------------------------------------------------------------------
    def validate_environment(self, *args, device_map=None, **kwargs):
        devices = device_map.items() if isinstance(device_map, dict) else [("", device_map)]
        for module, device in devices:
            if device not in (None, "cpu", "auto") and device != torch.device("cpu"):
                raise ValueError(
                    f"device_map puts {module or 'the model'!r} on {device!r}; hf_sparse's kernels run on the CPU: "
                    "load without device_map, or with device_map='cpu'"
                )
        if not extension_available():
            warnings.warn(
                "hf_sparse's C++ kernels are not loaded, so this model runs on their pure-torch reference (correct, "
                "slow). Rebuild them: pip install -e . --no-build-isolation",
                RuntimeWarning,
                stacklevel=2,
            )

    def update_device_map(self, device_map):
        return {"": "cpu"} if device_map == "auto" else device_map

    def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs):
        files = [str(f) for f in checkpoint_files or []]
        if files and files[0].endswith(".safetensors"):
            folder = Path(files[0]).parent
            if Path(files[0]).name == WEIGHTS_NAME or (folder / WEIGHTS_INDEX_NAME).is_file():
                # config block, files, headers, metadata, checksum lists, tensor sets
                self.checkpoint = SparseCheckpoint(folder)
        if self.checkpoint is None:
            logger.info("hf_sparse: no checkpoint folder to check; each module is still checked as it loads")
        self.modules = replace_modules(model, self.sparse)

    def deserialize(self, tensors: dict, param_name: str, model, missing_keys) -> dict[str, torch.Tensor]:
        """The load operation. `tensors` holds one module's on-disk tensors keyed by suffix; for a weight that is
        not converted it is just {"weight": tensor}, which passes through in the model's dtype."""
        tensors = {k: v[0] if isinstance(v, list) else v for k, v in tensors.items()}
        module_name = param_name.removesuffix(".weight")
        ckpt_name = self.modules.get(module_name)
        try:
            if ckpt_name is None:
                return self._pass_through(module_name, param_name, model, tensors)
            return self._decode(module_name, ckpt_name, model.get_submodule(module_name), tensors)
        except CheckpointError as e:
            self.errors.append(e)
            if missing_keys is not None:  # raised after loading; no "missing weights" report for it meanwhile
                missing_keys.difference_update({f"{module_name}.weight", f"{module_name}.weight_scale"})
            return {}

    def _pass_through(self, module_name: str, param_name: str, model, tensors: dict) -> dict[str, torch.Tensor]:
        """A weight stored as usual, cast to the model's dtype as transformers casts the tensors it loads itself."""
        extra = sorted(set(tensors) - {"weight"})
        if extra or "weight" not in tensors:
            raise CheckpointError(
                f"tensor '{module_name}.{(extra or ['weight'])[0]}' is unexpected: config.json's quantization_config "
                f"does not convert {module_name!r}"
            )
        value, target = tensors["weight"], model.get_parameter_or_buffer(param_name)
        if value.is_floating_point() and target.is_floating_point():
            value = value.to(target.dtype)
        return {param_name: value}

    def _decode(self, module_name: str, ckpt_name: str, module, tensors: dict) -> dict[str, torch.Tensor]:
        entry = self.sparse.modules[ckpt_name]
        if self.checkpoint is not None:
            for suffix, t in tensors.items():
                key = f"{ckpt_name}.{suffix}"
                if key not in self.checkpoint.keys or tensor_sha256(t) != self.checkpoint.checksum(key):
                    raise CheckpointError(
                        f"tensor {key!r} does not match its checksum: the file is corrupt; re-download or re-save it"
                    )
        validate(tensors, entry.format, entry.dtype, name=ckpt_name)
        stored = FORMATS.get(entry.format).decode(tensors)
        if tuple(stored.shape) != tuple(module.weight.shape):
            raise CheckpointError(
                f"module {ckpt_name!r} is stored with shape {tuple(stored.shape)}, but the model's "
                f"{module_name!r} needs {tuple(module.weight.shape)}: the checkpoint is for another configuration"
            )
        out = {f"{module_name}.weight": stored}
        if entry.dtype == "int8":
            out[f"{module_name}.weight_scale"] = tensors["weight_scale"]
        self.loaded.add(module_name)
        return out

    # ---- after loading ------------------------------------------------------------------------------------------
    def _process_model_after_weight_loading(self, model, **kwargs):
        if self.errors:
            raise self.errors[0]
        for module_name, ckpt_name in self.modules.items():
            if module_name not in self.loaded:
                entry = self.sparse.modules[ckpt_name]
                raise CheckpointError(
                    f"the checkpoint has no tensors for module {ckpt_name!r}, which its quantization_config stores "
                    f"as {entry.format} / {entry.dtype}"
                )
        self._check_biases(model)
        workload = model_workload(model)
        counts = pack_model(model, workload)
        self._rename_to_model()
        logger.info(
            "hf_sparse: packed %(linears)d Linears for %(workload)s: %(groups)d sibling groups, %(fused_gelu)d fused "
            "GELUs, %(fused_ffn)d fused FFNs",
            {**counts, "workload": "token-by-token decoding" if workload == "decode" else "batches"},
        )
        return model

    def _check_biases(self, model) -> None:
        """The biases of converted modules load through transformers like any plain tensor, so check them here:
        each against its checksum in the file, and the loaded value against the file's."""
        if self.checkpoint is None:
            return
        keys = {name: f"{ckpt}.bias" for name, ckpt in self.modules.items() if f"{ckpt}.bias" in self.checkpoint.keys}
        stored = self.checkpoint.read(list(keys.values()))  # raises naming a tensor that fails its checksum
        for module_name, key in keys.items():
            bias = getattr(model.get_submodule(module_name), "bias", None)
            if bias is None or not torch.equal(bias.detach(), stored[key].to(bias.dtype)):
                raise CheckpointError(
                    f"tensor {key!r} was not loaded into {module_name!r} as stored; re-save the checkpoint"
                )

    def _rename_to_model(self) -> None:
        """Name the config's modules as this model does (a checkpoint may have been loaded into another head), so
        that save_pretrained describes the model it saves."""
        block = self.sparse.to_dict()
        ckpt_to_model = {ckpt: name for name, ckpt in self.modules.items()}
        block["modules"] = {ckpt_to_model[k]: v for k, v in block["modules"].items() if k in ckpt_to_model}
        self.quantization_config.sparse = SparseQuantizationConfig.from_dict(block)
        self.modules = {name: name for name in self.modules}

    # ---- capabilities, saving, dequantizing ---------------------------------------------------------------------
    def is_serializable(self) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return False

    def get_load_operations(self) -> dict:
        return {"deserialize": SparseDeserialize}

    def get_state_dict_and_metadata(self, model):
        """The checkpoint-format tensors, plus the metadata every hf_sparse weight file carries (the config block and
        the tensors' checksums). save_pretrained writes the same metadata into every shard, so each shard of a
        sharded save lists the checksums of all the checkpoint's tensors; `SparseCheckpoint` accepts that (every
        file's tensors listed, all lists together naming exactly the checkpoint's tensors, and agreeing)."""
        state = compressed_state_dict(model, self.sparse)
        metadata = {
            METADATA_KEY: json.dumps(self.quantization_config.to_dict()),
            CHECKSUMS_KEY: json.dumps({k: tensor_sha256(v) for k, v in state.items()}),
        }
        return state, metadata

    def _dequantize(self, model, dtype=None):
        return dequantize_model(model, dtype)


def _same_class(a: type | None, b: type) -> bool:
    return a is not None and f"{a.__module__}.{a.__qualname__}" == f"{b.__module__}.{b.__qualname__}"


def register() -> None:
    """Register the backend with transformers under "hf_sparse" (done by `import hf_sparse`). Registering again,
    e.g. after a module reload, replaces the earlier classes; a different class registered under the name is left
    alone, with a warning (`require_registered` then raises)."""
    from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING

    for mapping, cls, register_fn in (
        (AUTO_QUANTIZATION_CONFIG_MAPPING, HfSparseConfig, register_quantization_config),
        (AUTO_QUANTIZER_MAPPING, HfSparseQuantizer, register_quantizer),
    ):
        current = mapping.get(QUANT_METHOD)
        if current is None:
            register_fn(QUANT_METHOD)(cls)
        elif _same_class(current, cls):
            mapping[QUANT_METHOD] = cls
        else:
            warnings.warn(
                f"transformers already has quant_method {QUANT_METHOD!r} registered to {current.__module__}."
                f"{current.__qualname__}; hf_sparse checkpoints will not load onto hf_sparse's kernels",
                RuntimeWarning,
                stacklevel=2,
            )


def require_registered() -> None:
    """Raise unless transformers will load hf_sparse checkpoints with this backend. Without it, transformers only
    warns about the unknown quant_method and leaves every compressed Linear randomly initialised."""
    from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING

    quantizer = AUTO_QUANTIZER_MAPPING.get(QUANT_METHOD)
    config = AUTO_QUANTIZATION_CONFIG_MAPPING.get(QUANT_METHOD)
    if quantizer is not HfSparseQuantizer or config is not HfSparseConfig:
        who = "nothing" if quantizer is None else f"{quantizer.__module__}.{quantizer.__qualname__}"
        raise RuntimeError(
            f"transformers' quant_method {QUANT_METHOD!r} is registered to {who}, not hf_sparse's backend: "
            "`import hf_sparse` before from_pretrained (it registers the backend); if it was imported, another "
            "package took the name"
        )
