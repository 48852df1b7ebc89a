from __future__ import annotations

from dataclasses import dataclass, field


DTYPES = ("float32", "float64")


def _positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"method_args.{name} must be an int >= 1, got {value!r}")


@dataclass
class OBertArgs:
    """Settings of oBERT (Kurtic et al. 2022). Defaults are the paper's.

    Args:
        num_grads: m, the number of gradients in the empirical Fisher (summed over processes when distributed).
        damping: lambda in F = lambda * I + (1/m) sum g g^T. The touchiest knob: it must be small next to the
            squared gradients, or oBERT degrades to magnitude pruning.
        block_size: B, the Fisher block size over each flattened weight. Default 50 for "unstructured" and 32 for
            "4-block" (which needs a multiple of 4). Memory is 4 * B bytes per weight (8 * B with float64).
        grad_batch_size: samples per gradient, drawn from the training data (16 for GLUE, 8 for SQuAD in the
            paper). Applies when the data source is a DataLoader over a map-style dataset; an iterable of batches
            gives one gradient per batch as it comes.
        num_recomputations: split each pruning step into this many sub-steps, each with a fresh Fisher.
        fisher_chunk: gradients folded into the inverse at once: a rank-k Sherman-Morrison (Woodbury) update, the
            same inverse as k single updates but k times fewer passes over memory. 1 is plain Sherman-Morrison.
        dtype: "float32" or "float64" for the Fisher inverse.
        max_memory_gb: refuse to build a Fisher inverse larger than this (checked when pruning is attached, before
            anything is allocated). None: no limit; the estimate is logged either way.
        seed: seed of the sampler that draws the gradient batches.
    """

    num_grads: int = field(default=1024, metadata={"help": "m, gradients in the empirical Fisher."})
    damping: float = field(default=1e-7, metadata={"help": "lambda, Fisher dampening, > 0."})
    block_size: int | None = field(default=None, metadata={"help": "Fisher block size (50 / 32 for 4-block)."})
    grad_batch_size: int = field(default=16, metadata={"help": "Samples per gradient."})
    num_recomputations: int = field(default=1, metadata={"help": "Sub-steps per pruning step, fresh Fisher each."})
    fisher_chunk: int = field(default=16, metadata={"help": "Gradients per inverse update (1 = Sherman-Morrison)."})
    dtype: str = field(default="float32", metadata={"help": "'float32' or 'float64' Fisher inverse."})
    max_memory_gb: float | None = field(default=None, metadata={"help": "Refuse Fisher inverses above this size."})
    seed: int = field(default=0, metadata={"help": "Seed of the gradient sampler."})

    def __post_init__(self):
        for name in ("num_grads", "grad_batch_size", "num_recomputations", "fisher_chunk"):
            _positive_int(name, getattr(self, name))
        if isinstance(self.damping, bool) or not isinstance(self.damping, (int, float)) or not self.damping > 0:
            raise ValueError(f"method_args.damping must be > 0, got {self.damping!r}")
        self.damping = float(self.damping)
        if self.block_size is not None:
            _positive_int("block_size", self.block_size)
        if self.dtype not in DTYPES:
            raise ValueError(f"method_args.dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.max_memory_gb is not None and (
            isinstance(self.max_memory_gb, bool)
            or not isinstance(self.max_memory_gb, (int, float))
            or not self.max_memory_gb > 0
        ):
            raise ValueError(f"method_args.max_memory_gb must be > 0 or None, got {self.max_memory_gb!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"method_args.seed must be an int, got {self.seed!r}")
