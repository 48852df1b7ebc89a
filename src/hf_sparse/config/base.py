"""Save/load for hf_sparse's dataclass configs, written once: JSON or YAML, sorted, stamped with the version."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, TypeVar

import yaml

from ..utils.io import atomic_file
from ..version import __version__


C = TypeVar("C", bound="ConfigMixin")

VERSION_KEY = "hf_sparse_version"


def _to_plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return value.to_dict() if isinstance(value, ConfigMixin) else dataclasses.asdict(value)
    if isinstance(value, dict):
        return {str(k): _to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_plain(v) for v in value]
    return value


class ConfigMixin:
    """Mixin for `@dataclass` configs: `to_dict`, JSON/YAML files, `save_pretrained` / `from_pretrained`.

    Subclasses set `config_name`, the file written into a folder by `save_pretrained`. Unknown keys are refused
    (a typo in a recipe must not be silently ignored); the stamped `hf_sparse_version` key is accepted and dropped.
    """

    config_name: str = "config.json"

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: _to_plain(getattr(self, f.name)) for f in dataclasses.fields(self) if f.init}
        return out

    def to_json_string(self) -> str:
        return json.dumps({**self.to_dict(), VERSION_KEY: __version__}, indent=2, sort_keys=True) + "\n"

    def to_yaml_string(self) -> str:
        return yaml.safe_dump({**self.to_dict(), VERSION_KEY: __version__}, sort_keys=True)

    @classmethod
    def from_dict(cls: type[C], data: dict[str, Any]) -> C:
        if not isinstance(data, dict):
            raise TypeError(f"{cls.__name__}.from_dict expects a dict, got {type(data).__name__}")
        data = dict(data)
        data.pop(VERSION_KEY, None)
        known = {f.name for f in dataclasses.fields(cls) if f.init}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(
                f"{cls.__name__} got unknown field(s) {unknown}; known fields: {sorted(known)}. "
                "Check the spelling in your recipe."
            )
        return cls(**data)

    def save_file(self, path: str | os.PathLike) -> Path:
        """Write the config to `path` (`.json`, `.yaml` or `.yml`) atomically."""
        path = Path(path)
        text = self.to_yaml_string() if path.suffix in (".yaml", ".yml") else self.to_json_string()
        with atomic_file(path, "w", encoding="utf-8") as f:
            f.write(text)
        return path

    @classmethod
    def from_file(cls: type[C], path: str | os.PathLike) -> C:
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as e:
            raise OSError(f"Cannot read {cls.__name__} file {str(path)!r}: {e}") from e
        try:
            data = yaml.safe_load(text) if path.suffix in (".yaml", ".yml") else json.loads(text)
        except (json.JSONDecodeError, yaml.YAMLError) as e:
            raise ValueError(f"{cls.__name__} file {str(path)!r} is not valid {path.suffix.lstrip('.')}: {e}") from e
        return cls.from_dict(data)

    def save_pretrained(self, save_directory: str | os.PathLike) -> Path:
        """Write `<save_directory>/<config_name>` (JSON), creating the folder if needed."""
        save_directory = Path(save_directory)
        if save_directory.is_file():
            raise ValueError(f"save_directory {str(save_directory)!r} is a file; pass a folder")
        return self.save_file(save_directory / self.config_name)

    @classmethod
    def from_pretrained(cls: type[C], name_or_path: str | os.PathLike, **hub_kwargs) -> C:
        """Load from a file, from a folder holding `config_name`, or from a Hub repository id."""
        path = Path(name_or_path)
        if path.is_file():
            return cls.from_file(path)
        if path.is_dir():
            candidate = path / cls.config_name
            if not candidate.is_file():
                raise FileNotFoundError(f"No {cls.config_name} in folder {str(path)!r}")
            return cls.from_file(candidate)
        name = str(name_or_path)
        if path.suffix in (".json", ".yaml", ".yml") or isinstance(name_or_path, os.PathLike) or _looks_local(name):
            raise FileNotFoundError(
                f"{cls.__name__}.from_pretrained: {name!r} does not exist (it looks like a local file or folder, not "
                "a Hub repository id 'org/name'); check the path"
            )
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import HfHubHTTPError, HFValidationError, LocalEntryNotFoundError

        try:
            return cls.from_file(hf_hub_download(name, cls.config_name, **hub_kwargs))
        except (HFValidationError, LocalEntryNotFoundError, HfHubHTTPError) as e:
            raise OSError(
                f"{cls.__name__}.from_pretrained: {name!r} is neither a local file or folder nor a Hub repository "
                f"whose {cls.config_name} could be downloaded ({type(e).__name__}: {e})"
            ) from e


def _looks_local(name: str) -> bool:
    """A relative or absolute path rather than a Hub id 'org/name' (which has at most one '/' and no '.' start)."""
    return name.startswith((".", "/", "~")) or "\\" in name or name.count("/") > 1
