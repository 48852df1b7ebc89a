from __future__ import annotations

from dataclasses import dataclass, field


VARIANTS = ("hard", "soft")
SCORE_UPDATES = ("adam", "sum")


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
        variant: "hard": the score of a weight is its accumulated movement -sum_t W_t * dL/dW'_t (W the stored
            value, also for masked weights), and each pruning step keeps the top of all scores to the schedule's
            target, so masked weights can come back. "soft": scores are learned with Adam from the straight-through
            gradient W * dL/dW' plus the regulariser `regularization * mean(sigmoid(S))`; during the ramp masks keep
            sigmoid(S) > threshold, so lambda sets the sparsity, and the last pruning step keeps the top scores to
            the exact target (see docs/methods.md).
        score_update: how the scores follow W * dL/dW' each step: "sum" subtracts it (the paper's formula,
            S = -sum_t W_t dL/dW'_t), "adam" takes an Adam step of `score_lr` on it, as the paper's code does (its
            scores are parameters of the optimizer, learning rate 1e-2): each score then moves by about the same
            amount per step whatever the weight's size, so a large weight's gradient noise does not outrank a small
            weight's steady drift. None (default): "sum" for hard movement, "adam" for soft, which needs it.
        score_lr: Adam learning rate of the scores (the paper uses 1e-2).
        regularization: lambda of the soft variant's regulariser, >= 0.
        threshold: tau of the soft variant, in (0, 1): a weight is kept while sigmoid(S) > tau (the paper's code
            ends at 0.1).
        regrow: let masked weights come back when their score rises into the top (the paper's rule). Off by
            default: the paper re-ranks at every step, this engine at its pruning steps only, and on the SST-2
            benchmark (a pruning step every 100 optimizer steps) each re-ranking swapped a large share of the kept
            weights at once and left a constant-output model (docs/methods.md); without it a pruned weight stays
            pruned (its score stops mattering), which reached 73.7 at 90% there.
    """

    variant: str = field(default="hard", metadata={"help": "'hard' or 'soft' movement."})
    score_update: str | None = field(default=None, metadata={"help": "'sum' (the formula) or 'adam'."})
    score_lr: float = field(default=1e-2, metadata={"help": "Adam learning rate of the scores."})
    regularization: float = field(default=1.0, metadata={"help": "Soft variant's sigmoid(S) regulariser weight."})
    threshold: float = field(default=0.1, metadata={"help": "Soft variant keeps sigmoid(S) > threshold."})
    regrow: bool = field(default=False, metadata={"help": "Masked weights may come back (the paper's rule)."})

    def __post_init__(self):
        if self.variant not in VARIANTS:
            raise ValueError(f"method_args.variant must be one of {VARIANTS}, got {self.variant!r}")
        if self.score_update is None:
            self.score_update = "adam" if self.variant == "soft" else "sum"
        if self.score_update not in SCORE_UPDATES:
            raise ValueError(f"method_args.score_update must be one of {SCORE_UPDATES}, got {self.score_update!r}")
        if self.variant == "soft" and self.score_update != "adam":
            raise ValueError(
                "method_args.score_update='sum' does not work with variant='soft': soft movement learns its scores "
                "with Adam against a regulariser; leave score_update unset (or 'adam')"
            )
        self.score_lr = _number("score_lr", self.score_lr, 0.0, strict=True)
        self.regularization = _number("regularization", self.regularization, 0.0, strict=False)
        self.threshold = _number("threshold", self.threshold, 0.0, strict=True)
        if not isinstance(self.regrow, bool):
            raise TypeError(f"method_args.regrow must be True or False, got {self.regrow!r}")
        if self.threshold >= 1.0:
            raise ValueError(
                f"method_args.threshold must be in (0, 1): sigmoid(S) never reaches {self.threshold!r}; "
                "the paper's code uses 0.1"
            )
