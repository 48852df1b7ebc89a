"""Knowledge distillation through forward hooks: `model(**batch).loss` becomes the distillation-mixed loss.

Hooks (not a Trainer subclass) make it work under the Trainer, accelerate and plain loops alike, and inside DDP's
forward. The teacher is held here, never registered as a submodule, so DDP and optimizers never see it.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from ..config import DistillationConfig
from .loss import kd_loss


logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
# Inputs only the student's loss needs; the teacher gets everything else.
_LOSS_ONLY_KWARGS = ("labels", "num_items_in_batch", "start_positions", "end_positions", "shift_labels")


class LossIgnoredError(RuntimeError):
    """Raised when the distillation loss would be silently ignored by the training loop."""


def load_teacher(teacher: nn.Module | str, student: nn.Module) -> nn.Module:
    if isinstance(teacher, nn.Module):
        return teacher
    if not hasattr(type(student), "from_pretrained"):
        raise TypeError(
            f"distillation.teacher={teacher!r} is a path, but the student ({type(student).__name__}) has no "
            "from_pretrained to load it with; pass the teacher model object instead"
        )
    try:
        return type(student).from_pretrained(teacher)
    except Exception as e:  # noqa: BLE001 - re-raised with the field named
        raise OSError(f"Could not load distillation.teacher={teacher!r} as {type(student).__name__}: {e}") from e


def _logit_fields(output: Any) -> list[str]:
    keys = output.keys() if isinstance(output, dict) else []
    return [k for k in keys if k.endswith("logits") and torch.is_tensor(output[k])]


def _count_items(labels: torch.Tensor, shift: bool) -> torch.Tensor:
    if shift:
        labels = labels[..., 1:]
    return labels.ne(IGNORE_INDEX).sum()


class Distiller:
    """Mixes `hardness * KD + (1 - hardness) * task loss` into the loss a model returns in training mode.

    Gradient accumulation: when the Trainer passes `num_items_in_batch` it stops dividing the loss by the
    accumulation count and trusts the model to normalise by it, which many heads (BERT's) ignore. The Distiller
    removes that argument so the model returns its plain micro-batch mean, then scales the mixed loss by
    items-in-this-micro-batch / num_items_in_batch: the sum over micro-batches is the mean over the whole
    accumulated batch, for any head. With hardness 0 the model's loss is left exactly as it was.
    """

    def __init__(self, model: nn.Module, config: DistillationConfig, teacher: nn.Module | str | None = None):
        teacher = teacher if teacher is not None else config.teacher
        if teacher is None:
            raise ValueError("distillation is set but has no teacher: set distillation.teacher to a model or a path")
        self.config = config
        self.model = model
        self.teacher = load_teacher(teacher, model)
        self.teacher.eval()
        self.teacher.requires_grad_(False)
        device = next((p.device for p in model.parameters()), None)
        if device is not None:
            self.teacher.to(device)
        self.require_loss = False  # set by the Trainer callback: a missing loss then means it would be ignored
        self._num_items: Any = None
        self._sums = {"kd_loss": 0.0, "task_loss": 0.0}
        self._count = 0
        self.last: dict[str, float] = {}
        self._handles = [
            model.register_forward_pre_hook(self._pre_hook, with_kwargs=True),
            model.register_forward_hook(self._hook, with_kwargs=True),
        ]

    @property
    def _changes_loss(self) -> bool:
        return self.config.hardness > 0.0

    def _pre_hook(self, module: nn.Module, args: tuple, kwargs: dict):
        self._num_items = None
        if module.training and self._changes_loss and "num_items_in_batch" in kwargs:
            kwargs = dict(kwargs)
            self._num_items = kwargs.pop("num_items_in_batch")
            return args, kwargs
        return None

    def _hook(self, module: nn.Module, args: tuple, kwargs: dict, output: Any):
        if not module.training:
            return None
        fields = _logit_fields(output)
        if not fields:
            raise TypeError(
                f"distillation needs the model to return a ModelOutput with logits; {type(module).__name__} "
                f"returned {type(output).__name__}. Call it with return_dict=True"
            )
        task_loss = output.get("loss")
        if task_loss is None and (self.require_loss or self.config.hardness < 1.0):
            raise LossIgnoredError(
                "hf_sparse distillation mixes the KD term into outputs.loss, but the model got no labels and "
                "returned no loss. Under the Trainer this happens with compute_loss_func=... or "
                "label_smoothing_factor>0, which pop the labels and then ignore outputs.loss, so distillation "
                "would be silently skipped: remove those options. In your own loop, pass labels, or use "
                "distillation.hardness=1.0 for pure distillation."
            )
        teacher_kwargs = {k: v for k, v in kwargs.items() if k not in _LOSS_ONLY_KWARGS}
        with torch.no_grad():
            teacher_out = self.teacher(*args, **teacher_kwargs)
        attention_mask = kwargs.get("attention_mask")
        terms = []
        for field in fields:
            student, teacher = output[field], teacher_out[field]
            valid = None
            if student.dim() == 3 and attention_mask is not None and attention_mask.shape == student.shape[:2]:
                valid = attention_mask.bool()
            terms.append(kd_loss(student, teacher, self.config.temperature, valid))
        kd = torch.stack(terms).mean()

        self._sums["kd_loss"] += float(kd.detach())
        if task_loss is not None:
            self._sums["task_loss"] += float(task_loss.detach())
        self._count += 1
        if not self._changes_loss:
            return None
        h = self.config.hardness
        loss = h * kd if task_loss is None else (1.0 - h) * task_loss + h * kd
        if self._num_items is not None:
            labels = kwargs.get("shift_labels")
            shift = False
            if labels is None:
                labels = kwargs.get("labels")
                shift = _is_causal_lm(module)
            if labels is not None:
                ratio = _count_items(labels, shift).to(loss.device, torch.float32) / torch.as_tensor(
                    self._num_items, device=loss.device, dtype=torch.float32
                )
                loss = loss * ratio
        output["loss"] = loss.to(task_loss.dtype) if task_loss is not None else loss
        return output

    def pop_metrics(self) -> dict[str, float]:
        """Mean KD and task loss over the training forwards since the last call (empty if none)."""
        if not self._count:
            return {}
        out = {f"distillation/{k}": v / self._count for k, v in self._sums.items()}
        self._sums = dict.fromkeys(self._sums, 0.0)
        self._count = 0
        self.last = out
        return out

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


def _is_causal_lm(module: nn.Module) -> bool:
    try:
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    except ImportError:  # pragma: no cover
        return False
    return module._get_name() in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values() if hasattr(module, "_get_name") else False
