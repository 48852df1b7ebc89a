from __future__ import annotations

from dataclasses import dataclass, field


VARIANTS = ("hard", "soft")


def _number(name: str, value, minimum: float, strict: bool) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or value < minimum
        or (strict and value == minimum)
    ):
        raise ValueError(f"method_args.{name} must be a number {'>' if strict else '>='} {minimum:g}, got {value!r}")
    return float(value)


@dataclass
class MovementArgs:
    """Settings of movement pruning (Sanh, Wolf & Rush 2020).

    Args:
        variant: "hard": the score of a weight is its accumulated movement -sum_t W_t * dL/dW_t, and the top of it
            is kept. "soft": scores are learned with Adam from the straight-through gradient W * dL/dW plus the
            regulariser `regularization * mean(sigmoid(S))`, which pushes down every score that the loss does not
            hold up; masks keep the top scores to the schedule's target (see docs/methods.md).
        score_lr: Adam learning rate of the soft scores (the paper uses 1e-2).
        regularization: lambda of the soft variant's regulariser, >= 0.
    """

    variant: str = field(default="hard", metadata={"help": "'hard' or 'soft' movement."})
    score_lr: float = field(default=1e-2, metadata={"help": "Adam learning rate of the soft scores."})
    regularization: float = field(default=1.0, metadata={"help": "Soft variant's sigmoid(S) regulariser weight."})

    def __post_init__(self):
        if self.variant not in VARIANTS:
            raise ValueError(f"method_args.variant must be one of {VARIANTS}, got {self.variant!r}")
        self.score_lr = _number("score_lr", self.score_lr, 0.0, strict=True)
        self.regularization = _number("regularization", self.regularization, 0.0, strict=False)
