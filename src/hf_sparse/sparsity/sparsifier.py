"""The sparsification engine shared by `sparsify_` (any training loop) and `SparseCallback` (Trainer)."""

from __future__ import annotations

import json
import logging
import os
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from torch import nn

from ..config import SparseConfig
from ..methods import METHODS
from ..utils.io import save_safetensors_atomic
from ..version import __version__
from .patterns import get_pattern
from .schedules import SCHEDULES, Timeline
from .targets import final_sparsities, find_targets


logger = logging.getLogger(__name__)

STATE_FILE = "hf_sparse_state.safetensors"
# SparseConfig fields that decide the masks: state saved under other values is refused on load.
_RECIPE_FIELDS = (
    "method", "sparsity", "pattern", "distribution", "targets", "exclude", "sparsity_overrides", "schedule",
    "initial_sparsity", "start", "end", "update_every",
)  # fmt: skip
_ACTIVE: weakref.WeakKeyDictionary[nn.Module, Sparsifier] = weakref.WeakKeyDictionary()


@dataclass
class Pool:
    """Modules ranked together: all of them under global distribution, each one alone under uniform or override.

    `target` is the number of elements the current pruning step leaves pruned in the pool.
    """

    names: list[str]
    initial: float
    final: float
    numel: int
    target: int = 0


def default_loss_fn(model: nn.Module, batch: Any) -> torch.Tensor:
    """Loss for methods that need gradients: the model's own loss on a batch dict."""
    out = model(**batch) if isinstance(batch, dict) else model(*batch)
    loss = out["loss"] if isinstance(out, dict) else getattr(out, "loss", None)
    if loss is None:
        raise ValueError(
            "The model returned no loss for a batch drawn to compute pruning gradients; include labels in the "
            "batches or pass loss_fn=(model, batch) -> loss to sparsify_"
        )
    return loss


class Sparsifier:
    """Holds the masks, the schedule and the method for one model. Build it with `sparsify_`.

    After each optimizer step call `step()`: it prunes when the schedule says so and zeroes the pruned weights
    again, so they stay exactly zero whatever the optimizer (momentum, weight decay) did. Gradients of pruned
    weights are zeroed during backward (unless the method needs them). `remove()` leaves a plain model whose
    weights hold the zeros: no hooks, no extra parameters or buffers.
    """

    def __init__(
        self,
        model: nn.Module,
        config: SparseConfig,
        *,
        total_steps: int | None = None,
        dataloader: Iterable | None = None,
        loss_fn: Callable[[nn.Module, Any], torch.Tensor] | None = None,
        teacher: nn.Module | str | None = None,
    ):
        if not isinstance(config, SparseConfig):
            raise TypeError(f"config must be a SparseConfig, got {type(config).__name__}")
        if model in _ACTIVE:
            raise ValueError("This model already has an active Sparsifier; call .remove() on it first")
        self.model = model
        self.config = config
        self.pattern = get_pattern(config.pattern)
        self.schedule = SCHEDULES.get(config.schedule)()
        self.targets: dict[str, nn.Linear] = find_targets(model, config)
        for name, module in self.targets.items():
            if module.weight.dim() != 2 or module.weight.device.type == "meta":
                raise ValueError(
                    f"{name}.weight is {tuple(module.weight.shape)} on {module.weight.device}; hf_sparse prunes "
                    "materialised 2-D Linear weights; sharded (FSDP) and meta-device models are not supported yet. "
                    "Use DDP (the Trainer's default for several processes) or load the weights first"
                )
        self.shapes = {n: m.weight.shape for n, m in self.targets.items()}
        self.total_steps = total_steps
        start = config.resolve_step("start", total_steps)
        end = start if self.schedule.only_at_start else config.resolve_step("end", total_steps)
        if end < start:
            raise ValueError(f"start={config.start} resolves to step {start}, after end={config.end} (step {end})")
        self.timeline = Timeline(start, end, config.update_every)
        if total_steps is not None and self.timeline.end > total_steps:
            logger.warning(
                "end=%s resolves to step %d, after the last training step %d: the final sparsity will not be reached",
                config.end,
                self.timeline.end,
                total_steps,
            )
        self.dataloader = dataloader
        self.loss_fn = loss_fn or default_loss_fn
        self.masks: dict[str, torch.Tensor] = {
            n: torch.ones(m.weight.shape, dtype=torch.bool, device=m.weight.device) for n, m in self.targets.items()
        }
        self._pruned: dict[str, torch.Tensor] = {}
        self.pools = self._build_pools()
        self.global_step = 0
        self.last_prune_step: int | None = None
        self.method = METHODS.get(config.method)(self, config.method_args)
        self.method.attach()
        self._hooks = []
        if self.method.mask_gradients:
            for name, module in self.targets.items():
                self._hooks.append(module.weight.register_hook(self._grad_mask_hook(name)))
        self.distiller = None
        if config.distillation is not None:
            from ..distillation import Distiller

            self.distiller = Distiller(model, config.distillation, teacher=teacher)
        _ACTIVE[model] = self

    # ---- set-up ---------------------------------------------------------------------------------------------
    def _build_pools(self) -> list[Pool]:
        cfg = self.config
        overrides = final_sparsities(list(self.targets), cfg)
        numel = {n: m.weight.numel() for n, m in self.targets.items()}
        pools = []
        shared = [n for n in self.targets if overrides[n] is None]
        if cfg.distribution == "global" and shared:
            pools.append(Pool(shared, cfg.initial_sparsity, cfg.sparsity, sum(numel[n] for n in shared)))
            shared = []
        for name in self.targets:
            if overrides[name] is not None or name in shared:
                final = cfg.sparsity if overrides[name] is None else overrides[name]
                pools.append(Pool([name], min(cfg.initial_sparsity, final), final, numel[name]))
        return pools

    def _grad_mask_hook(self, name: str):
        def hook(grad: torch.Tensor) -> torch.Tensor:
            pruned = self._pruned.get(name)
            return grad if pruned is None else grad.masked_fill(pruned, 0)

        return hook

    # ---- the training-loop API ------------------------------------------------------------------------------
    def before_optimizer_step(self) -> None:
        """Call after backward (and clipping), before `optimizer.step()`. Only some methods need it."""
        self.method.before_optimizer_step()

    def step(self, global_step: int | None = None) -> bool:
        """Call after each `optimizer.step()`. Prunes if `global_step` is a pruning step; re-applies the masks.

        `global_step` counts optimizer steps done so far (1 after the first); by default the Sparsifier counts.
        Returns True when masks changed.
        """
        self.global_step = self.global_step + 1 if global_step is None else int(global_step)
        changed = False
        if self.schedule.is_update_step(self.global_step, self.timeline) and (
            self.last_prune_step is None or self.global_step > self.last_prune_step
        ):
            self._prune(self.global_step)
            changed = True
        self.apply_masks()
        return changed

    @torch.no_grad()
    def _prune(self, step: int) -> None:
        if self.schedule.keeps_existing:
            new = {n: self.pattern.keep_from_weight(m.weight) for n, m in self.targets.items()}
        else:
            for pool in self.pools:
                sparsity = self.schedule.sparsity(step, self.timeline, pool.initial, pool.final)
                pool.target = int(round(sparsity * pool.numel))
            new = self.method.prune(self.pools)
            missing = set(self.targets) - set(new)
            if missing:
                raise RuntimeError(f"{type(self.method).__name__}.prune returned no mask for {sorted(missing)[:3]}")
        self.set_masks(new)
        self.last_prune_step = step
        logger.info("hf_sparse step %d: sparsity %.4f", step, self.sparsity()["global"])

    def set_masks(self, masks: dict[str, torch.Tensor]) -> None:
        """Install keep-masks (bool, weight-shaped), identical on every process, and zero the pruned weights."""
        for name, mask in masks.items():
            if name not in self.targets:
                raise KeyError(f"mask for {name!r}, which is not a targeted module")
            if mask.shape != self.shapes[name] or mask.dtype != torch.bool:
                raise ValueError(
                    f"mask for {name!r} must be bool of shape {tuple(self.shapes[name])}, "
                    f"got {mask.dtype} {tuple(mask.shape)}"
                )
            self.masks[name] = mask.to(self.targets[name].weight.device)
        self._sync_masks()
        self._pruned = {n: ~m for n, m in self.masks.items()}
        self.apply_masks()

    def _sync_masks(self) -> None:
        dist = torch.distributed
        if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return
        # every rank computes the same masks from the same weights; broadcasting rank 0's makes it a guarantee
        for name in self.targets:
            buf = self.masks[name].to(torch.uint8)
            if dist.get_backend() == "nccl":
                buf = buf.cuda()
            dist.broadcast(buf, src=0)
            self.masks[name] = buf.to(self.masks[name].device).bool()

    @torch.no_grad()
    def apply_masks(self) -> None:
        """Zero every pruned weight (exact +0.0)."""
        for name, pruned in self._pruned.items():
            self.targets[name].weight.masked_fill_(pruned, 0.0)

    # ---- reporting ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def sparsity(self) -> dict[str, float]:
        """Measured fraction of zeros: {"global": ..., <module name>: ...} over the targeted weights."""
        out, zeros, total = {}, 0, 0
        for name, module in self.targets.items():
            z = int((module.weight == 0).sum())
            n = module.weight.numel()
            out[name] = z / n
            zeros += z
            total += n
        return {"global": zeros / max(total, 1), **out}

    def target_sparsity(self, step: int | None = None) -> float:
        """What the schedule asks for at `step` (default: the last pruning step), over all targeted weights."""
        step = self.last_prune_step if step is None else self.timeline.last_update_at_or_before(step)
        if step is None:
            return 0.0
        total = sum(p.numel for p in self.pools)
        return (
            sum(self.schedule.sparsity(step, self.timeline, p.initial, p.final) * p.numel for p in self.pools) / total
        )

    # ---- state ----------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        tensors = {f"masks.{n}": m.to(torch.uint8).cpu().contiguous() for n, m in self.masks.items()}
        for key, value in self.method.state_dict().items():
            tensors[f"method.{key}"] = value.detach().cpu().contiguous()
        meta = {
            "global_step": self.global_step,
            "last_prune_step": self.last_prune_step,
            "pools": [p.target for p in self.pools],
            "config": self.config.to_dict(),
            "hf_sparse_version": __version__,
        }
        return {"tensors": tensors, "meta": meta}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        tensors, meta = state["tensors"], state["meta"]
        self._check_same_recipe(meta.get("config"))
        masks = {}
        for name in self.targets:
            key = f"masks.{name}"
            if key not in tensors:
                raise KeyError(f"hf_sparse state has no tensor {key!r}: it was saved for other targets")
            masks[name] = tensors[key].bool()
        extra = sorted(k[6:] for k in tensors if k.startswith("masks.") and k[6:] not in self.targets)
        if extra:
            raise KeyError(f"hf_sparse state has masks for modules this model does not target: {extra[:3]}")
        self.method.load_state_dict({k[7:]: v for k, v in tensors.items() if k.startswith("method.")})
        self.set_masks(masks)
        self.global_step = int(meta["global_step"])
        self.last_prune_step = meta["last_prune_step"]
        for pool, target in zip(self.pools, meta.get("pools", [])):
            pool.target = int(target)

    def _check_same_recipe(self, saved: dict | None) -> None:
        """Masks and method state only make sense under the recipe that produced them: refuse another one."""
        if saved is None:
            return
        now = self.config.to_dict()
        changed = [k for k in _RECIPE_FIELDS if k in saved and saved[k] != now.get(k)]
        if changed:
            details = ", ".join(f"{k}: saved {saved[k]!r}, now {now.get(k)!r}" for k in changed)
            raise ValueError(
                f"hf_sparse state was saved under another recipe ({details}). Resume with the recipe it was saved "
                "with, or start a new run (a new output_dir) for the new recipe"
            )

    def save(self, path: str | os.PathLike) -> Path:
        """Write the state (masks, method state, step counters) to a safetensors file, atomically."""
        path = Path(path)
        if path.is_dir() or not path.suffix:
            path = path / STATE_FILE
        state = self.state_dict()
        save_safetensors_atomic(state["tensors"], path, metadata={"hf_sparse": json.dumps(state["meta"])})
        return path

    def load(self, path: str | os.PathLike) -> None:
        path = Path(path)
        if path.is_dir():
            path = path / STATE_FILE
        try:
            tensors = load_file(str(path))
            with safe_open(str(path), "pt") as f:
                meta = json.loads((f.metadata() or {})["hf_sparse"])
        except (OSError, SafetensorError, KeyError, json.JSONDecodeError) as e:
            raise ValueError(f"{str(path)!r} is not a valid hf_sparse state file: {e}") from e
        self.load_state_dict({"tensors": tensors, "meta": meta})

    # ---- tear-down ------------------------------------------------------------------------------------------
    def remove(self) -> nn.Module:
        """Detach everything, leaving the model's weights dense tensors that hold the zeros. Returns the model."""
        self.apply_masks()
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()
        self.method.detach()
        if self.distiller is not None:
            self.distiller.remove()
        _ACTIVE.pop(self.model, None)
        return self.model


def sparsify_(model: nn.Module, config: SparseConfig, **kwargs) -> Sparsifier:
    """Attach hf_sparse to `model` in place and return the Sparsifier that drives it.

    Prunes right away when the schedule starts at step 0 (e.g. one-shot pruning with `start=0`). In a training
    loop, call `sparsifier.step()` after every `optimizer.step()`, and `sparsifier.remove()` when done.

    Keyword args: `total_steps` (needed when start/end are fractions), `dataloader` and `loss_fn` (for methods
    that need gradients, such as oBERT), `teacher` (overrides `config.distillation.teacher`).
    """
    sparsifier = Sparsifier(model, config, **kwargs)
    sparsifier.step(0)
    return sparsifier
