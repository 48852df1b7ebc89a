from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any

from .base import ConfigMixin
from .distillation import DistillationConfig


DISTRIBUTIONS = ("global", "uniform")


def _check_when(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be an int (optimizer steps) or a float in [0, 1] (fraction of training)")
    if isinstance(value, int) and value < 0:
        raise ValueError(f"{name}={value} must be >= 0 steps")
    if isinstance(value, float) and not 0.0 <= value <= 1.0:
        raise ValueError(f"{name}={value} is a float, read as a fraction of training, so it must be in [0, 1]")


def _check_module_keys(name: str, keys: list[str]) -> None:
    for key in keys:
        if not isinstance(key, str) or not key:
            raise TypeError(f"{name} entries must be non-empty strings (module names or regexes), got {key!r}")
        try:
            re.compile(key)
        except re.error as e:
            raise ValueError(f"{name} entry {key!r} is not a valid regex: {e}") from e


@dataclass
class SparseConfig(ConfigMixin):
    """What to prune, how, and when. Shared by `sparsify_` (any training loop) and `SparseCallback` (Trainer).

    Args:
        method: pruning method, a name from `hf_sparse.methods.METHODS` ("magnitude", "movement", "obert").
        sparsity: final fraction of zeros in the targeted weights, in [0, 1).
        pattern: where zeros may go. "unstructured"; "4-block" (4 consecutive weights along the input dimension of
            one output row: the unit of the int8 VNNI kernels); "N:M" such as "2:4" (at most N non-zeros in every
            M consecutive input weights; the final sparsity must then be 1 - N/M).
        distribution: "global" ranks all targeted weights together, so layers end with different sparsities that
            average to `sparsity`; "uniform" gives every targeted module the same sparsity.
        targets: which nn.Linear modules to prune. None (default) means every nn.Linear inside the model's repeated
            blocks (the encoder/decoder layer stack), so not embeddings, pooler or task head. Otherwise a list of
            entries, each a module-name suffix ("query", "attention.output.dense") or a regex matched against the
            full module name ("bert\\.encoder\\.layer\\.[0-5]\\..*").
        exclude: entries (same syntax as `targets`) removed from the targets.
        sparsity_overrides: {entry: sparsity} for modules that need their own final sparsity; those modules are
            ranked on their own even with global distribution.
        schedule: how sparsity grows: "cubic" (Zhu & Gupta 2017), "linear", "one-shot" (everything at `start`),
            "constant" (keep the zeros the model already has while fine-tuning; `sparsity` is not used).
        initial_sparsity: sparsity jumped to at `start` before the schedule ramps up (oBERT jumps to 0.7).
        start / end: first and last pruning step. An int is an optimizer step; a float in [0, 1] is a fraction of
            the total training steps. Pruning at step 0 happens before the first optimizer step.
        update_every: prune every this many optimizer steps between `start` and `end` (and always at `end`).
        distillation: a `DistillationConfig` (or dict) to distil from a teacher while pruning, or None.
        method_args: settings of the chosen method (a dict or the method's own args dataclass), validated by it.
    """

    config_name = "sparse_config.json"

    method: str = field(default="magnitude", metadata={"help": "Pruning method name."})
    sparsity: float = field(default=0.9, metadata={"help": "Final sparsity of the targeted weights, in [0, 1)."})
    pattern: str = field(default="unstructured", metadata={"help": "'unstructured', '4-block' or 'N:M'."})
    distribution: str = field(default="global", metadata={"help": "'global' or 'uniform'."})
    targets: list[str] | None = field(default=None, metadata={"help": "Modules to prune (None: layer stack)."})
    exclude: list[str] = field(default_factory=list, metadata={"help": "Modules never pruned."})
    sparsity_overrides: dict[str, float] = field(
        default_factory=dict, metadata={"help": "Per-module final sparsity {entry: sparsity}."}
    )
    schedule: str = field(default="cubic", metadata={"help": "'cubic', 'linear', 'one-shot' or 'constant'."})
    initial_sparsity: float = field(default=0.0, metadata={"help": "Sparsity jumped to at `start`."})
    start: int | float = field(default=0.0, metadata={"help": "First pruning step (int) or fraction (float)."})
    end: int | float = field(default=0.75, metadata={"help": "Last pruning step (int) or fraction (float)."})
    update_every: int = field(default=1, metadata={"help": "Prune every N optimizer steps."})
    distillation: DistillationConfig | None = field(default=None, metadata={"help": "Knowledge distillation."})
    method_args: Any = field(default_factory=dict, metadata={"help": "Method-specific settings."})

    def __post_init__(self):
        from ..methods import METHODS
        from ..sparsity.patterns import get_pattern
        from ..sparsity.schedules import SCHEDULES

        method_cls = METHODS.get(self.method)
        pattern = get_pattern(self.pattern)
        SCHEDULES.get(self.schedule)

        for name in ("sparsity", "initial_sparsity"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
                raise ValueError(f"{name} must be a number in [0, 1), got {value!r}")
            setattr(self, name, float(value))
        if self.initial_sparsity > self.sparsity:
            raise ValueError(
                f"initial_sparsity={self.initial_sparsity} is above sparsity={self.sparsity}; it must not exceed it"
            )
        if self.distribution not in DISTRIBUTIONS:
            raise ValueError(f"Unknown distribution={self.distribution!r}; known: {', '.join(DISTRIBUTIONS)}")

        if self.targets is not None:
            if isinstance(self.targets, str):
                self.targets = [self.targets]
            self.targets = list(self.targets)
            if not self.targets:
                raise ValueError("targets=[] selects nothing; pass None for the default (the model's layer stack)")
            _check_module_keys("targets", self.targets)
        if isinstance(self.exclude, str):
            self.exclude = [self.exclude]
        self.exclude = list(self.exclude or [])
        _check_module_keys("exclude", self.exclude)
        if not isinstance(self.sparsity_overrides, dict):
            raise TypeError("sparsity_overrides must be a dict {module entry: sparsity}")
        _check_module_keys("sparsity_overrides", list(self.sparsity_overrides))
        for key, value in self.sparsity_overrides.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
                raise ValueError(f"sparsity_overrides[{key!r}] must be a number in [0, 1), got {value!r}")
        self.sparsity_overrides = {k: float(v) for k, v in self.sparsity_overrides.items()}

        if self.schedule != "constant":
            pattern.check_sparsity("sparsity", self.sparsity)
            for key, value in self.sparsity_overrides.items():
                pattern.check_sparsity(f"sparsity_overrides[{key!r}]", value)

        _check_when("start", self.start)
        _check_when("end", self.end)
        if type(self.start) is type(self.end) and self.start > self.end:
            raise ValueError(f"start={self.start} is after end={self.end}; pruning must start before it ends")
        if isinstance(self.update_every, bool) or not isinstance(self.update_every, int) or self.update_every < 1:
            raise ValueError(f"update_every must be an int >= 1, got {self.update_every!r}")

        if isinstance(self.distillation, dict):
            self.distillation = DistillationConfig.from_dict(self.distillation)
        elif self.distillation is not None and not isinstance(self.distillation, DistillationConfig):
            raise TypeError(
                f"distillation must be a DistillationConfig, a dict or None, got {type(self.distillation).__name__}"
            )

        args_cls = method_cls.args_class
        if self.method_args is None:
            self.method_args = {}
        if isinstance(self.method_args, dict):
            known = {f.name for f in dataclasses.fields(args_cls)}
            unknown = sorted(set(self.method_args) - known)
            if unknown:
                raise ValueError(
                    f"method_args has unknown field(s) {unknown} for method={self.method!r}; known: {sorted(known)}"
                )
            self.method_args = args_cls(**self.method_args)
        elif not isinstance(self.method_args, args_cls):
            raise TypeError(
                f"method_args for method={self.method!r} must be a dict or {args_cls.__name__}, "
                f"got {type(self.method_args).__name__}"
            )
        method_cls.validate_config(self)

    def resolve_step(self, name: str, total_steps: int | None) -> int:
        """`start` or `end` as an optimizer step; fractions need the total number of training steps."""
        value = getattr(self, name)
        if isinstance(value, int):
            return value
        if value == 0.0:
            return 0
        if total_steps is None:
            raise ValueError(
                f"{name}={value} is a fraction of training, so the total number of optimizer steps is needed: "
                f"pass total_steps= to sparsify_ (the Trainer callback does this), or give {name} in steps (an int)"
            )
        return int(round(value * total_steps))
