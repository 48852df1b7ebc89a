"""Which nn.Linear modules a SparseConfig prunes, and the final sparsity each one aims for."""

from __future__ import annotations

import re

from torch import nn


def matches(entry: str, name: str) -> bool:
    """An entry matches a module name as a dotted suffix ("query", "attention.self.query") or as a full regex."""
    if name == entry or name.endswith("." + entry):
        return True
    try:
        return re.fullmatch(entry, name) is not None
    except re.error:
        return False


def layer_stack_linears(model: nn.Module) -> list[str]:
    """Names of the nn.Linear modules inside the model's repeated blocks (children of an nn.ModuleList).

    This is the encoder/decoder layer stack in every Transformers architecture; embeddings, poolers and task heads
    live outside it.
    """
    names = []
    for list_name, module_list in model.named_modules():
        if not isinstance(module_list, nn.ModuleList):
            continue
        prefix = f"{list_name}." if list_name else ""
        for sub_name, sub in module_list.named_modules():
            if isinstance(sub, nn.Linear) and sub_name:
                names.append(prefix + sub_name)
    # nested ModuleLists (e.g. experts inside layers) list a module twice
    return list(dict.fromkeys(names))


def _example_names(names: list[str], limit: int = 3) -> str:
    return ", ".join(repr(n) for n in names[:limit]) + (", ..." if len(names) > limit else "")


def find_targets(model: nn.Module, config) -> dict[str, nn.Linear]:
    """The modules `config` (a SparseConfig) prunes, in model order. Raises when an entry matches nothing."""
    modules = dict(model.named_modules())
    linears = [name for name, m in modules.items() if isinstance(m, nn.Linear)]
    model_name = type(model).__name__
    if config.targets is None:
        names = layer_stack_linears(model)
        if not names:
            raise ValueError(
                f"targets=None selects the nn.Linear layers inside the layer stack (an nn.ModuleList), but "
                f"{model_name} has none there; pass targets=[...] with module names such as "
                f"{_example_names(linears) or 'the names from model.named_modules()'}"
            )
    else:
        names = []
        for entry in config.targets:
            hits = [n for n in linears if matches(entry, n)]
            if not hits:
                raise ValueError(
                    f"targets entry {entry!r} matches no nn.Linear in {model_name}; its Linear modules are named "
                    f"like {_example_names(linears)}. Use a name suffix or a regex over the full name."
                )
            names.extend(hits)
        names = [n for n in linears if n in set(names)]
    for entry in config.exclude:
        if not any(matches(entry, n) for n in names):
            raise ValueError(
                f"exclude entry {entry!r} matches none of the targeted modules ({_example_names(names)}); "
                "fix or remove it"
            )
    names = [n for n in names if not any(matches(e, n) for e in config.exclude)]
    if not names:
        raise ValueError("targets minus exclude leaves no module to prune; check the exclude entries")
    for entry in config.sparsity_overrides:
        if not any(matches(entry, n) for n in names):
            raise ValueError(
                f"sparsity_overrides entry {entry!r} matches none of the targeted modules "
                f"({_example_names(names)}); fix or remove it"
            )
    return {n: modules[n] for n in names}


def final_sparsities(names: list[str], config) -> dict[str, float | None]:
    """Per-module override from `sparsity_overrides` (the last matching entry wins), or None for the default."""
    out: dict[str, float | None] = {}
    for name in names:
        value = None
        for entry, sparsity in config.sparsity_overrides.items():
            if matches(entry, name):
                value = sparsity
        out[name] = value
    return out
