from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .base import ConfigMixin


@dataclass
class DistillationConfig(ConfigMixin):
    """Logits knowledge distillation from a teacher, mixed into the student's task loss.

    loss = (1 - hardness) * task_loss + hardness * T^2 * KL(softmax(teacher / T) || softmax(student / T))

    Args:
        teacher: a model, or a local path / Hub id loaded with the student's class. A model object is saved in
            recipes as its `name_or_path`.
        hardness: weight of the distillation term, in [0, 1]; 1.0 trains on the teacher alone (oBERT's setting).
        temperature: softmax temperature T > 0 (2.0 downstream; 5.5 in upstream oBERT recipes).
    """

    config_name = "distillation_config.json"

    teacher: Any = field(default=None, metadata={"help": "Teacher model, or a local path or Hub id to load it."})
    hardness: float = field(default=1.0, metadata={"help": "Weight of the KD term in [0, 1]."})
    temperature: float = field(default=2.0, metadata={"help": "Softmax temperature, > 0."})

    def __post_init__(self):
        if not isinstance(self.hardness, (int, float)) or not 0.0 <= self.hardness <= 1.0:
            raise ValueError(f"distillation.hardness must be a number in [0, 1], got {self.hardness!r}")
        if not isinstance(self.temperature, (int, float)) or not self.temperature > 0:
            raise ValueError(f"distillation.temperature must be > 0, got {self.temperature!r}")
        self.hardness = float(self.hardness)
        self.temperature = float(self.temperature)
        if self.teacher is not None and not isinstance(self.teacher, str) and not hasattr(self.teacher, "forward"):
            raise TypeError(
                f"distillation.teacher must be a model or a path / Hub id string, got {type(self.teacher).__name__}"
            )

    def to_dict(self) -> dict[str, Any]:
        teacher = self.teacher
        if teacher is not None and not isinstance(teacher, str):
            config = getattr(teacher, "config", None)
            teacher = getattr(teacher, "name_or_path", None) or getattr(config, "name_or_path", None) or None
        return {"teacher": teacher, "hardness": self.hardness, "temperature": self.temperature}
