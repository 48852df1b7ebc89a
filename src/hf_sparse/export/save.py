"""`save_sparse`: write a pruned transformers model as a compressed, self-describing hf_sparse checkpoint."""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import SparseConfig
from ..sparsity.patterns import Pattern, get_pattern
from ..sparsity.targets import find_targets, matches
from ..utils.io import atomic_dir
from .card import CardInfo, CheckpointFacts, build_model_card
from .config import ModuleEntry, SparseQuantizationConfig, TensorScheme
from .formats import STORAGE_DTYPES, WeightFormat, compress, dtype_name, format_for
from .options import ExportConfig


logger = logging.getLogger(__name__)

WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
CARD_NAME = "README.md"
#: safetensors metadata keys: the quantization_config (JSON) and {tensor name: sha256 of its bytes} (JSON)
METADATA_KEY = "hf_sparse"
CHECKSUMS_KEY = "hf_sparse_sha256"


def tensor_sha256(t: torch.Tensor) -> str:
    """sha256 of a tensor's bytes as safetensors stores them (row-major, little-endian)."""
    return hashlib.sha256(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()).hexdigest()


@dataclass
class ExportPlan:
    """Which modules become what: {module name: (format, storage dtype)}, plus the modules left as they are."""

    pattern: Pattern | None
    converted: dict[str, tuple[WeightFormat, str]] = field(default_factory=dict)
    not_converted: list[str] = field(default_factory=list)
    #: storage dtype of the floating-point tensors stored as usual (None: their own)
    float_dtype: str | None = None


def _select(model: nn.Module, entries: list[str], kind: type[nn.Module], field_name: str) -> list[str]:
    """Names of the `kind` modules matched by `entries` (suffixes or regexes), in model order."""
    names = [n for n, m in model.named_modules() if isinstance(m, kind)]
    for entry in entries:
        if not any(matches(entry, n) for n in names):
            raise ValueError(
                f"{field_name} entry {entry!r} matches no {kind.__name__} in {type(model).__name__}; its "
                f"{kind.__name__} modules are named like {', '.join(repr(n) for n in names[:3]) or '(none)'}"
            )
    return [n for n in names if any(matches(e, n) for e in entries)]


def _check_follows(name: str, weight: torch.Tensor, pattern: Pattern) -> None:
    nonzero = weight.detach() != 0
    if not pattern.follows(nonzero):
        sparsity = 1.0 - float(nonzero.float().mean())
        raise ValueError(
            f"module {name!r} (sparsity {sparsity:.2%}) does not follow pattern={pattern.name!r}: its zeros are not "
            f"laid out as {pattern.name} requires. Export with the pattern it was pruned with (pattern=...), or prune "
            "it with this one."
        )


def plan_export(model: nn.Module, config: SparseConfig | None, options: ExportConfig) -> ExportPlan:
    """Decide every module's format and check the sparse ones against the pattern (raises naming the module)."""
    if options.modules is not None:
        sparse = _select(model, options.modules, nn.Linear, "modules")
    elif config is not None:
        sparse = list(find_targets(model, config))
    else:
        raise ValueError(
            "save_sparse needs to know which Linear modules are sparse: pass the recipe (config=SparseConfig(...)) "
            "or modules=[...]"
        )
    pattern_name = options.pattern or (config.pattern if config is not None else None)
    if pattern_name is None:
        raise ValueError("save_sparse needs the sparsity pattern: pass pattern='4-block' (or the recipe, config=...)")
    if options.pattern and config is not None and options.pattern != config.pattern:
        raise ValueError(
            f"pattern={options.pattern!r} differs from the recipe's pattern={config.pattern!r}; the weights follow "
            "the recipe's, so leave pattern unset"
        )
    pattern = get_pattern(pattern_name)
    fmt = format_for(pattern)
    modules = dict(model.named_modules())
    plan = ExportPlan(pattern, float_dtype=options.float_dtype)
    for name in sparse:
        weight = modules[name].weight
        _check_weight(name, weight)
        _check_follows(name, weight, pattern)
        if options.weight_dtype is None and weight.dtype not in STORAGE_DTYPES.values():
            raise ValueError(f"module {name!r} has a {weight.dtype} weight; pass weight_dtype='float32' (or another)")
        plan.converted[name] = (fmt, options.weight_dtype or dtype_name(weight.dtype))
    dtypes = sorted({dtype for _, dtype in plan.converted.values()})
    if len(dtypes) > 1:
        raise ValueError(f"the sparse modules have mixed weight dtypes {dtypes}; pass weight_dtype=... to store one")

    def pick(value, kind, field_name):
        if value is True:
            return [n for n, m in modules.items() if isinstance(m, kind) and n not in plan.converted]
        return _select(model, value, kind, field_name) if value else []

    for name in pick(options.int8_linears, nn.Linear, "int8_linears"):
        if name in plan.converted:
            raise ValueError(f"int8_linears entry selects {name!r}, which is already stored sparse; remove it")
        _check_weight(name, modules[name].weight)
        plan.converted[name] = (WeightFormat.DENSE, "int8")
    for name in pick(options.int8_embeddings, nn.Embedding, "int8_embeddings"):
        _check_weight(name, modules[name].weight)
        plan.converted[name] = (WeightFormat.DENSE, "int8")
    plan.not_converted = [
        n for n, m in modules.items() if isinstance(m, (nn.Linear, nn.Embedding)) and n not in plan.converted
    ]
    return plan


def _check_weight(name: str, weight: torch.Tensor) -> None:
    if weight.device.type == "meta":
        raise ValueError(f"module {name!r} has its weight on the meta device (offloaded); load it fully first")
    if not weight.is_floating_point() or weight.ndim != 2:
        raise ValueError(
            f"module {name!r} has a {weight.dtype} weight of shape {tuple(weight.shape)}; expected 2-D float"
        )


def _plain_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict without tied aliases (kept under the name `save_pretrained` keeps), on the CPU."""
    state = model.state_dict()
    try:
        from transformers.modeling_utils import remove_tied_weights_from_state_dict

        state = remove_tied_weights_from_state_dict(dict(state), model)
    except (ImportError, AttributeError, TypeError):  # not a PreTrainedModel, or transformers moved it
        seen: dict[tuple, str] = {}
        for key in list(state):
            t = state[key]
            ident = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype)
            if ident in seen:
                del state[key]
            else:
                seen[ident] = key
    for key, t in state.items():
        if t.device.type == "meta":
            raise ValueError(f"tensor {key!r} is on the meta device (offloaded); load the model fully before saving")
    return {k: v.detach().cpu().contiguous() for k, v in state.items()}


def convert_state_dict(
    model: nn.Module, plan: ExportPlan
) -> tuple[dict[str, torch.Tensor], SparseQuantizationConfig, dict[str, int], int]:
    """The tensors to write, the quantization_config describing them, each converted module's weight count, and the
    bytes the dense tensors take."""
    state = _plain_state_dict(model)
    dense_bytes = sum(t.numel() * t.element_size() for t in state.values())
    entries: dict[str, ModuleEntry] = {}
    numel: dict[str, int] = {}
    zeros = total = 0
    written: set[str] = set()  # tensors of converted modules, which keep their format's dtypes
    for name, (fmt, dtype) in list(plan.converted.items()):
        key = f"{name}.weight"
        if key not in state:  # tied to another module's weight, which is stored (and converted) under its name
            if fmt is not WeightFormat.DENSE:
                raise ValueError(
                    f"module {name!r} shares its weight with another module (tied weights), so it cannot be stored "
                    "sparse on its own; exclude it from the sparse modules or untie it"
                )
            del plan.converted[name]
            logger.info("hf_sparse: %r shares its weight with another module; storing it once", name)
            continue
        weight = state.pop(key)
        tensors = compress(weight, fmt, dtype, pattern=plan.pattern if fmt is not WeightFormat.DENSE else None)
        for suffix, t in tensors.items():
            if f"{name}.{suffix}" in state:
                raise ValueError(f"cannot store {name!r}: the model already has a tensor named '{name}.{suffix}'")
            state[f"{name}.{suffix}"] = t
            written.add(f"{name}.{suffix}")
        n_zero = int((weight == 0).sum())
        entries[name] = ModuleEntry(fmt.value, dtype, round(n_zero / weight.numel(), 6))
        numel[name] = weight.numel()
        if fmt is not WeightFormat.DENSE:
            zeros += n_zero
            total += weight.numel()
    if plan.float_dtype is not None:
        cast = STORAGE_DTYPES[plan.float_dtype]
        for key, t in state.items():
            if key not in written and t.is_floating_point():
                state[key] = t.to(cast)
    sparse_dtypes = {e.dtype for e in entries.values() if e.format != WeightFormat.DENSE.value}
    weight_dtype = sparse_dtypes.pop() if sparse_dtypes else "float32"
    weights = TensorScheme.int8("weights") if weight_dtype == "int8" else TensorScheme(weight_dtype)
    any_int8 = any(e.dtype == "int8" for e in entries.values())
    qconfig = SparseQuantizationConfig(
        pattern=plan.pattern.name if total else None,
        weights=weights,
        input_activations=TensorScheme.int8("input_activations") if any_int8 else None,
        sparsity=round(zeros / total, 6) if total else None,
        modules=entries,
        modules_to_not_convert=list(plan.not_converted),
    )
    return state, qconfig, numel, dense_bytes


def write_weights(
    state: dict[str, torch.Tensor], folder: Path, qconfig: SparseQuantizationConfig, max_shard_size
) -> int:
    """Write the tensors as safetensors shards (with an index when there are several); return the bytes written."""
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file

    split = split_torch_state_dict_into_shards(
        state,
        filename_pattern=WEIGHTS_NAME.replace(".safetensors", "{suffix}.safetensors"),
        max_shard_size=max_shard_size,
    )
    qconfig_json = json.dumps(qconfig.to_dict(), sort_keys=True)
    written = 0
    for filename, keys in split.filename_to_tensors.items():
        shard = {k: state[k] for k in keys}
        metadata = {
            "format": "pt",
            METADATA_KEY: qconfig_json,
            CHECKSUMS_KEY: json.dumps({k: tensor_sha256(t) for k, t in shard.items()}, sort_keys=True),
        }
        save_file(shard, str(folder / filename), metadata=metadata)
        written += (folder / filename).stat().st_size
    if split.is_sharded:
        index = {"metadata": {"total_size": split.metadata["total_size"]}, "weight_map": split.tensor_to_filename}
        (folder / WEIGHTS_INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return written


#: names save_sparse writes besides the weight files (tokenizers add their class's `vocab_files_names` too)
CHECKPOINT_FILES = frozenset(
    {
        "config.json",
        "generation_config.json",
        "sparse_config.json",
        CARD_NAME,
        WEIGHTS_INDEX_NAME,
        # what transformers tokenizers save
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "added_tokens.json",
        "chat_template.jinja",
        "chat_template.json",
        "vocab.txt",
        "vocab.json",
        "merges.txt",
        "tokenizer.model",
        "spiece.model",
        "sentencepiece.bpe.model",
    }
)
_WEIGHT_FILE = re.compile(r"model(-\d{5}-of-\d{5})?\.safetensors")


def _is_weights_file(name: str) -> bool:
    """model.safetensors, its shards and their index: the files one save's weights are split into."""
    return name == WEIGHTS_INDEX_NAME or _WEIGHT_FILE.fullmatch(name) is not None


def _is_hf_sparse_checkpoint(path: Path) -> bool:
    try:
        block = json.loads((path / "config.json").read_text(encoding="utf-8")).get("quantization_config")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        return False
    return isinstance(block, dict) and block.get("quant_method") == "hf_sparse"


def _check_destination(path: Path, overwrite: bool, tokenizer: Any) -> bool:
    """Refuse to replace a folder holding anything save_sparse would not write again (see `save_sparse`); return
    whether the checkpoint must be merged into the folder (overwrite=True over such a folder)."""
    if path.is_file():
        raise ValueError(f"save_directory {str(path)!r} is a file; pass a folder")
    entries = sorted(os.listdir(path)) if path.is_dir() else []
    if not entries:
        return False
    ours = CHECKPOINT_FILES | set(getattr(tokenizer, "vocab_files_names", {}).values())
    if _is_hf_sparse_checkpoint(path):
        foreign = [e for e in entries if not (e in ours or _is_weights_file(e)) or not (path / e).is_file()]
        what = "an hf_sparse checkpoint plus entries save_sparse does not write"
    else:
        foreign, what = entries, "no hf_sparse checkpoint (no config.json with an hf_sparse quantization_config)"
    if not foreign or overwrite:
        return bool(foreign)
    shown = ", ".join(f"{e}/" if (path / e).is_dir() else e for e in foreign[:6])
    more = f" and {len(foreign) - 6} more" if len(foreign) > 6 else ""
    raise FileExistsError(
        f"save_directory {str(path)!r} holds {what}: {shown}{more}. save_sparse replaces its folder as a whole, "
        "so these would be lost. Pass a new or empty folder, move them elsewhere, or pass overwrite=True to write "
        "the checkpoint into this folder: its model files (config.json, model*.safetensors, README.md, ...) are "
        "replaced and everything else is kept"
    )


def save_sparse(
    model: nn.Module,
    save_directory: str | os.PathLike,
    config: SparseConfig | None = None,
    *,
    tokenizer: Any = None,
    card: CardInfo | dict | None = None,
    overwrite: bool = False,
    **options,
) -> Path:
    """Write `model` (a transformers model whose pruned weights hold exact zeros) as an hf_sparse checkpoint.

    The folder gets `model.safetensors` (sparse modules compressed, see docs/format.md), `config.json` with the
    `quantization_config` block, the recipe `sparse_config.json` (when `config` is given), the tokenizer (when
    given) and a model card `README.md`. The write is atomic: everything is written to a hidden temporary folder
    beside `save_directory` and flushed to disk, then takes its place in one rename, so an exception or a crash
    leaves the old folder or nothing (a hard kill may leave the temporary folder, `.<name>.<pid>.<random>.tmp`,
    which the next save to the same folder removes).

    Args:
        model: the model after pruning (e.g. after `Sparsifier.remove()`).
        save_directory: the folder to write. It must be new, empty, or an earlier hf_sparse checkpoint holding
            only files save_sparse writes, which is then replaced as a whole; anything else is refused, naming the
            files that would be lost.
        config: the SparseConfig the model was pruned with: selects the sparse modules and the pattern, and is
            saved beside the weights.
        tokenizer: saved into the folder when given.
        card: what the card should say beyond what is measured (`CardInfo`: base model, license, metrics, ...).
        overwrite: write into a folder that holds other things (a Trainer output folder, a dense checkpoint):
            the files this save writes replace those of the same names, the weight files and `sparse_config.json`
            of an earlier save are removed, and everything else (`checkpoint-500/`, `trainer_state.json`, ...) is
            kept. The files are moved in one by one, so a crash in the middle can leave a mix, which readers refuse.
        **options: `ExportConfig` fields: modules, pattern, weight_dtype ("int8", ...), int8_embeddings,
            int8_linears, float_dtype, max_shard_size.

    Returns the folder.
    """
    model_config = getattr(model, "config", None)
    if model_config is None or not hasattr(model_config, "save_pretrained"):
        raise TypeError(f"save_sparse expects a transformers PreTrainedModel, got {type(model).__name__}")
    if config is not None and not isinstance(config, SparseConfig):
        raise TypeError(f"config must be the SparseConfig the model was pruned with, got {type(config).__name__}")
    if not isinstance(overwrite, bool):
        raise TypeError(f"overwrite must be True or False, got {overwrite!r}")
    options = ExportConfig.from_kwargs(options)
    card = CardInfo.from_any(card)
    save_directory = Path(save_directory).absolute()
    merge = _check_destination(save_directory, overwrite, tokenizer)

    plan = plan_export(model, config, options)
    state, qconfig, numel, dense_bytes = convert_state_dict(model, plan)
    recipe_sparsity = config.sparsity if config is not None and config.schedule != "constant" else None
    if recipe_sparsity is not None and qconfig.sparsity is not None and qconfig.sparsity < recipe_sparsity - 0.01:
        logger.warning(
            "hf_sparse: the sparse modules are %.2f%% sparse, below the recipe's %.2f%%: was the model pruned?",
            100 * qconfig.sparsity,
            100 * recipe_sparsity,
        )
    model_config = copy.deepcopy(model_config)
    model_config.architectures = [type(model).__name__]
    model_config.dtype = str(getattr(model, "dtype", torch.float32)).split(".")[-1]
    model_config.quantization_config = qconfig.to_dict()

    stale = (lambda name: _is_weights_file(name) or name == "sparse_config.json") if merge else None
    with atomic_dir(save_directory, merge=stale) as tmp:
        checkpoint_bytes = write_weights(state, tmp, qconfig, options.max_shard_size)
        model_config.save_pretrained(tmp)
        generation_config = getattr(model, "generation_config", None)
        if generation_config is not None and getattr(model, "can_generate", lambda: False)():
            generation_config.save_pretrained(tmp)
        if config is not None:
            config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        facts = CheckpointFacts(
            model_class=type(model).__name__,
            quantization=qconfig,
            numel=numel,
            dense_bytes=dense_bytes,
            dense_dtype=str(model_config.dtype),
            checkpoint_bytes=checkpoint_bytes,
            recipe=config,
            has_tokenizer=tokenizer is not None,
            location=card.repo_id or str(save_directory),
            float_dtype=plan.float_dtype,
            model_tags=list(getattr(model, "model_tags", None) or []),
            name_or_path=str(getattr(model_config, "_name_or_path", "") or ""),
        )
        build_model_card(card, facts).save(tmp / CARD_NAME)
    logger.info(
        "hf_sparse: saved %s (%d modules converted, %.1f MB, %.1fx smaller than the dense weights)",
        save_directory,
        len(qconfig.modules),
        checkpoint_bytes / 1e6,
        dense_bytes / max(checkpoint_bytes, 1),
    )
    return save_directory
