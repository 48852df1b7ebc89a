"""`SparseCheckpoint`: open an hf_sparse checkpoint folder, refuse anything malformed, hand out module tensors.

The transformers backend and the kernels build on this: it checks the config block, the file set, every header and
every module's tensor set on open (headers only, no tensor data), then checks each module's data (checksums, counts,
indices, padding, scales) as it is read.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .config import SparseQuantizationConfig
from .errors import CheckpointError
from .formats import WeightFormat, decompress, tensor_names, validate
from .save import CHECKSUMS_KEY, METADATA_KEY, WEIGHTS_INDEX_NAME, WEIGHTS_NAME, tensor_sha256


@dataclass
class CompressedModule:
    """One converted module as stored: its entry in the quantization_config and its tensors, keyed by suffix
    (`compressed`, `bitmask`, ..., `weight_scale`, and `bias` when it has one). Already validated."""

    name: str
    format: WeightFormat
    dtype: str
    sparsity: float
    tensors: dict[str, torch.Tensor]
    shape: torch.Size

    def decompress(self) -> torch.Tensor:
        """The dense weight: in the storage dtype for float formats, float32 for int8 (dequantized)."""
        weight_tensors = {k: v for k, v in self.tensors.items() if k != "bias"}
        return decompress(weight_tensors, self.format, self.dtype, name=self.name, check=False)


def _read_json(path: Path, what: str) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{str(path)!r} is missing: {what}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{str(path)!r} is not valid JSON ({e}); the file is corrupt or truncated") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{str(path)!r} must hold a JSON object")
    return data


class SparseCheckpoint:
    """A checkpoint folder written by `save_sparse`, checked on open.

    Args:
        path: the folder.
        verify_checksums: compare every tensor read with the sha256 stored in its file's metadata.

    Attributes: `config` (config.json as a dict), `quantization` (SparseQuantizationConfig), `files` (weight file
    names), `keys` ({tensor name: file name}).
    """

    def __init__(self, path: str | os.PathLike, *, verify_checksums: bool = True):
        from safetensors import SafetensorError, safe_open

        self.path = Path(path)
        self.verify_checksums = verify_checksums
        if not self.path.is_dir():
            raise CheckpointError(f"{str(self.path)!r} is not a folder; pass the folder save_sparse wrote")
        self.config = _read_json(self.path / "config.json", "every checkpoint has one")
        block = self.config.get("quantization_config")
        if block is None:
            raise CheckpointError(
                f"{str(self.path / 'config.json')!r} has no quantization_config: this is not an hf_sparse checkpoint "
                "(a plain save_pretrained folder loads with from_pretrained directly)"
            )
        try:
            self.quantization = SparseQuantizationConfig.from_dict(block)
        except CheckpointError as e:
            raise CheckpointError(f"{str(self.path / 'config.json')!r}: {e}") from None

        self.files = self._weight_files()
        self.keys: dict[str, str] = {}
        self._headers: dict[str, dict[str, tuple[str, tuple[int, ...]]]] = {}
        self._checksums: dict[str, dict[str, str]] = {}
        for filename in self.files:
            file = self.path / filename
            try:
                with safe_open(str(file), "pt") as f:
                    metadata = f.metadata() or {}
                    header = {}
                    for key in f.keys():  # noqa: SIM118 (a safe_open handle is not iterable)
                        sl = f.get_slice(key)
                        header[key] = (sl.get_dtype(), tuple(sl.get_shape()))
            except FileNotFoundError:
                raise CheckpointError(f"weights file {str(file)!r} is missing") from None
            except (SafetensorError, OSError) as e:
                raise CheckpointError(
                    f"weights file {str(file)!r} is truncated or corrupt ({e}); re-download or re-save it"
                ) from None
            self._check_metadata(filename, metadata, header)
            self._headers[filename] = header
            for key in header:
                if key in self.keys:
                    raise CheckpointError(f"tensor {key!r} is in both {self.keys[key]!r} and {filename!r}")
                self.keys[key] = filename
        if self._index is not None:
            listed = dict(self._index)
            if listed != self.keys:
                diff = sorted(set(listed.items()) ^ set(self.keys.items()))[0]
                raise CheckpointError(
                    f"{WEIGHTS_INDEX_NAME} does not match the weight files: tensor {diff[0]!r} ({diff[1]!r}); the "
                    "folder mixes files from different saves"
                )
        self._check_checksum_lists()
        self._check_structure()

    # ---- opening ------------------------------------------------------------------------------------------------
    def _weight_files(self) -> list[str]:
        self._index = None
        index_path = self.path / WEIGHTS_INDEX_NAME
        if index_path.is_file():
            weight_map = _read_json(index_path, "").get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise CheckpointError(f"{str(index_path)!r} has no weight_map")
            for key, filename in weight_map.items():
                if not isinstance(filename, str) or "/" in filename or "\\" in filename or filename.startswith("."):
                    raise CheckpointError(
                        f"{str(index_path)!r} maps {key!r} to {filename!r}, not a file in the folder"
                    )
            self._index = weight_map
            return sorted(set(weight_map.values()))
        if not (self.path / WEIGHTS_NAME).is_file():
            raise CheckpointError(f"{str(self.path)!r} has neither {WEIGHTS_NAME} nor {WEIGHTS_INDEX_NAME}")
        return [WEIGHTS_NAME]

    def _check_metadata(self, filename: str, metadata: dict, header: dict) -> None:
        where = str(self.path / filename)
        stored = metadata.get(METADATA_KEY)
        if stored is None:
            raise CheckpointError(f"{where!r} has no {METADATA_KEY!r} metadata: it was not written by save_sparse")
        try:
            stored = json.loads(stored)
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{where!r}: its {METADATA_KEY!r} metadata is not valid JSON ({e})") from None
        if stored != self.config["quantization_config"]:
            keys = sorted(set(stored) | set(self.config["quantization_config"]))
            key = next(k for k in keys if stored.get(k) != self.config["quantization_config"].get(k))
            raise CheckpointError(
                f"config.json's quantization_config differs from the one stored in {filename!r} (first at {key!r}): "
                "the config was edited or the files come from different saves"
            )
        try:
            checksums = json.loads(metadata.get(CHECKSUMS_KEY, "null"))
        except json.JSONDecodeError:
            checksums = None
        if not isinstance(checksums, dict) or not all(isinstance(v, str) for v in checksums.values()):
            raise CheckpointError(
                f"{where!r}: its {CHECKSUMS_KEY!r} metadata is missing or is not a JSON object of sha256 strings; "
                "the file was altered after hf_sparse wrote it"
            )
        unlisted = sorted(set(header) - set(checksums))
        if unlisted:
            raise CheckpointError(
                f"{where!r}: the {CHECKSUMS_KEY!r} metadata does not list the file's tensor {unlisted[0]!r}; the file "
                "was altered after hf_sparse wrote it"
            )
        self._checksums[filename] = checksums

    def _check_checksum_lists(self) -> None:
        """save_sparse lists exactly each file's tensors; transformers' save_pretrained writes one metadata dict, so
        its shards each list the whole checkpoint. Either way all lists together must name exactly the tensors
        the files hold, and agree wherever they overlap."""
        seen: dict[str, tuple[str, str]] = {}  # tensor -> (checksum, file listing it)
        for filename in self.files:
            for key, checksum in self._checksums[filename].items():
                if key not in self.keys:
                    raise CheckpointError(
                        f"{str(self.path / filename)!r}: its {CHECKSUMS_KEY!r} metadata lists tensor {key!r}, which "
                        "no weight file holds: a shard is missing or the files come from different saves"
                    )
                if key in seen and seen[key][0] != checksum:
                    raise CheckpointError(
                        f"the {CHECKSUMS_KEY!r} metadata of {seen[key][1]!r} and {filename!r} disagree on tensor "
                        f"{key!r}: the files come from different saves, or one was altered"
                    )
                seen.setdefault(key, (checksum, filename))

    def checksum(self, key: str) -> str:
        """The sha256 stored for tensor `key` by the file holding it."""
        return self._checksums[self.keys[key]][key]

    def read(self, keys: list[str]) -> dict[str, torch.Tensor]:
        """The named tensors as stored, each checked against its checksum (when `verify_checksums`)."""
        missing = [k for k in keys if k not in self.keys]
        if missing:
            raise CheckpointError(f"{str(self.path)!r} has no tensor {missing[0]!r}")
        with self._open() as get:
            return {k: get(k) for k in keys}

    def _check_structure(self) -> None:
        """Every converted module has exactly its format's tensors (and maybe a bias); nothing else uses its name."""
        expected_keys = set()
        for name, entry in self.quantization.modules.items():
            expected = set(tensor_names(entry.format, entry.dtype))
            for suffix in sorted(expected):
                if f"{name}.{suffix}" not in self.keys:
                    raise CheckpointError(
                        f"tensor '{name}.{suffix}' is missing from the weight files, but config.json stores {name!r} "
                        f"as {entry.format} / {entry.dtype}"
                    )
            expected_keys |= {f"{name}.{s}" for s in expected | {"bias"}}
        prefixes = tuple(f"{name}." for name in self.quantization.modules)
        for key in self.keys:
            if key.startswith(prefixes) and key not in expected_keys:
                module = next(p for p in prefixes if key.startswith(p))[:-1]
                raise CheckpointError(
                    f"tensor {key!r} is unexpected: config.json stores {module!r} as "
                    f"{self.quantization.modules[module].format}, which has no such tensor"
                )

    # ---- reading --------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _open(self) -> Iterator:
        from safetensors import safe_open

        with contextlib.ExitStack() as stack:
            handles: dict = {}

            def get(key: str) -> torch.Tensor:
                filename = self.keys[key]
                if filename not in handles:  # opened on first use: a single read touches one file
                    handles[filename] = stack.enter_context(safe_open(str(self.path / filename), "pt"))
                t = handles[filename].get_tensor(key)
                if self.verify_checksums and tensor_sha256(t) != self._checksums[filename][key]:
                    raise CheckpointError(
                        f"tensor {key!r} in {filename!r} does not match its checksum: the file is corrupt; "
                        "re-download or re-save it"
                    )
                return t

            yield get

    def modules(self) -> Iterator[CompressedModule]:
        """Each converted module's tensors, validated, in config order."""
        with self._open() as get:
            for name, entry in self.quantization.modules.items():
                suffixes = tensor_names(entry.format, entry.dtype)
                tensors = {s: get(f"{name}.{s}") for s in suffixes}
                try:
                    shape = validate(tensors, entry.format, entry.dtype, name=name)
                except CheckpointError as e:
                    raise CheckpointError(f"{str(self.path)!r}: {e}") from None
                if f"{name}.bias" in self.keys:
                    bias = tensors["bias"] = get(f"{name}.bias")
                    if tuple(bias.shape) != (shape[0],):
                        raise CheckpointError(
                            f"tensor '{name}.bias' has shape {tuple(bias.shape)}, but the weight has {shape[0]} rows"
                        )
                yield CompressedModule(name, WeightFormat(entry.format), entry.dtype, entry.sparsity, tensors, shape)

    def plain_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, tensor) for everything stored as usual (biases of converted modules excluded)."""
        prefixes = tuple(f"{name}." for name in self.quantization.modules)
        with self._open() as get:
            for key in sorted(self.keys):
                if not key.startswith(prefixes):
                    yield key, get(key)

    def validate(self) -> None:
        """Read and check everything (open already checked the structure)."""
        for _ in self.modules():
            pass
        for _ in self.plain_tensors():
            pass

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The dense state dict: converted weights decompressed (int8 dequantized to float32), the rest as stored."""
        state = dict(self.plain_tensors())
        for module in self.modules():
            state[f"{module.name}.weight"] = module.decompress()
            if "bias" in module.tensors:
                state[f"{module.name}.bias"] = module.tensors["bias"]
        return state

    def load_into(self, model: nn.Module) -> nn.Module:
        """Load the decompressed weights into a dense `model` of the checkpoint's architecture (e.g. built with
        `from_config`), checking names and shapes. Tied weights missing from the file are re-tied."""
        state = self.state_dict()
        own = model.state_dict()
        unexpected = sorted(set(state) - set(own))
        if unexpected:
            raise CheckpointError(
                f"tensor {unexpected[0]!r} of {str(self.path)!r} has no place in {type(model).__name__}"
            )
        for key, t in state.items():
            if tuple(own[key].shape) != tuple(t.shape):
                raise CheckpointError(
                    f"tensor {key!r} of {str(self.path)!r} has shape {tuple(t.shape)}, but {type(model).__name__} "
                    f"expects {tuple(own[key].shape)}"
                )
        tied = set()
        if hasattr(model, "get_expanded_tied_weights_keys"):
            tied = set(model.get_expanded_tied_weights_keys(all_submodels=True))
        missing = sorted(set(own) - set(state) - tied)
        if missing:
            raise CheckpointError(
                f"{str(self.path)!r} has no tensor {missing[0]!r}, which {type(model).__name__} needs"
            )
        model.load_state_dict(state, strict=False)
        if tied and hasattr(model, "tie_weights"):
            model.tie_weights()
        return model
