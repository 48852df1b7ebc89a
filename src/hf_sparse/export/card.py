"""The model card (README.md) of an hf_sparse checkpoint, built with huggingface_hub's ModelCard / ModelCardData.

Everything in it is measured by `save_sparse` or given by the user in `CardInfo`; unknown fields are left out.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from ..version import __version__
from .config import SparseQuantizationConfig
from .formats import WeightFormat


if TYPE_CHECKING:
    from huggingface_hub import ModelCard

    from ..config import SparseConfig

BASE_MODEL_RELATIONS = ("quantized", "finetune", "adapter", "merge")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_LAYER_INDEX = re.compile(r"^.*?\.\d+\.")
_INDEX = re.compile(r"\.\d+\.")


@dataclass
class CardInfo:
    """What the model card says beyond what `save_sparse` measures. Every field is optional.

    Args:
        base_model: Hub id of the dense model this one was pruned from. Default: the model's `name_or_path` when it
            looks like a Hub id (as `from_pretrained("org/name")` sets it).
        base_model_relation: "quantized", "finetune", ... Default: "quantized" for int8 weights, else "finetune".
        license / language / datasets: Hub metadata (datasets: the data it was trained on, Hub ids).
        pipeline_tag: the task, e.g. "text-classification".
        tags: extra tags (hf-sparse, sparse, pruned and int8 are added as they apply).
        model_name: the title; default: the repository or folder name.
        repo_id: where the checkpoint will live, for the usage snippet (push_to_hub fills it in).
        metrics: {metric: value} of this model, measured on `eval_dataset` (split `eval_split`).
        dense_metrics: the same metrics for the dense model, for the comparison table.
        eval_dataset / eval_dataset_config / eval_split: Hub id, config and split the metrics were measured on;
            `metrics` needs `eval_dataset` and `pipeline_tag` (they go into the card's model-index).
    """

    base_model: str | None = None
    base_model_relation: str | None = None
    license: str | None = None
    language: str | list[str] | None = None
    datasets: list[str] | None = None
    pipeline_tag: str | None = None
    tags: list[str] = field(default_factory=list)
    model_name: str | None = None
    repo_id: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    dense_metrics: dict[str, float] = field(default_factory=dict)
    eval_dataset: str | None = None
    eval_dataset_config: str | None = None
    eval_split: str | None = None

    def __post_init__(self):
        if self.base_model_relation is not None and self.base_model_relation not in BASE_MODEL_RELATIONS:
            raise ValueError(
                f"card.base_model_relation={self.base_model_relation!r}; known: {', '.join(BASE_MODEL_RELATIONS)}"
            )
        if isinstance(self.datasets, str):
            self.datasets = [self.datasets]
        if isinstance(self.tags, str):
            self.tags = [self.tags]
        for name in ("metrics", "dense_metrics"):
            values = getattr(self, name)
            if not isinstance(values, dict):
                raise TypeError(f"card.{name} must be a dict {{metric name: number}}, got {type(values).__name__}")
            for key, value in values.items():
                if isinstance(value, bool) or not isinstance(value, (int, float)):
                    raise TypeError(f"card.{name}[{key!r}] must be a number, got {value!r}")
        extra = sorted(set(self.dense_metrics) - set(self.metrics))
        if extra:
            raise ValueError(f"card.dense_metrics has {extra[0]!r}, which card.metrics lacks; give both or neither")
        if self.metrics and (self.eval_dataset is None or self.pipeline_tag is None):
            missing = "eval_dataset" if self.eval_dataset is None else "pipeline_tag"
            raise ValueError(
                f"card.metrics needs card.{missing}: a metric is only meaningful with the task (pipeline_tag, e.g. "
                "'text-classification') and the dataset it was measured on (eval_dataset, a Hub id)"
            )

    @classmethod
    def from_any(cls, value: CardInfo | dict | None) -> CardInfo:
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value
        if isinstance(value, dict):
            unknown = sorted(set(value) - set(cls.__dataclass_fields__))
            if unknown:
                raise TypeError(f"card got unknown field(s) {unknown}; known: {sorted(cls.__dataclass_fields__)}")
            return cls(**value)
        raise TypeError(f"card must be a CardInfo, a dict or None, got {type(value).__name__}")

    def with_repo_id(self, repo_id: str) -> CardInfo:
        return replace(self, repo_id=repo_id)


@dataclass
class CheckpointFacts:
    """What `save_sparse` measured, for the card."""

    model_class: str
    quantization: SparseQuantizationConfig
    numel: dict[str, int]
    dense_bytes: int
    dense_dtype: str
    checkpoint_bytes: int
    recipe: SparseConfig | None
    has_tokenizer: bool
    location: str
    float_dtype: str | None = None
    model_tags: list[str] = field(default_factory=list)
    name_or_path: str = ""


def layer_type(name: str) -> str:
    """A module name without its layer-stack prefix and indices: 'bert.encoder.layer.3.attention.self.query' ->
    'attention.self.query', 'model.layers.0.mlp.experts.3.up_proj' -> 'mlp.experts.up_proj'."""
    return _INDEX.sub(".", _LAYER_INDEX.sub("", name))


def _mb(n: int) -> str:
    return f"{n / 1e6:.2f} MB"


def _fmt(value: float) -> str:
    return f"{value:.4g}"


def _sparsity_table(facts: CheckpointFacts) -> list[str]:
    rows: dict[tuple[str, str, str], list[int]] = {}
    for name, entry in facts.quantization.modules.items():
        key = (layer_type(name), entry.format, entry.dtype)
        zeros_total = rows.setdefault(key, [0, 0, 0])
        n = facts.numel[name]
        zeros_total[0] += 1
        zeros_total[1] += round(entry.sparsity * n)
        zeros_total[2] += n
    lines = ["| layer type | modules | stored as | dtype | sparsity |", "|---|---:|---|---|---:|"]
    for (kind, fmt, dtype), (count, zeros, total) in rows.items():
        lines.append(f"| `{kind}` | {count} | {fmt} | {dtype} | {zeros / total:.2%} |")
    return lines


def _eval_results(info: CardInfo) -> list:
    from huggingface_hub import EvalResult

    return [
        EvalResult(
            task_type=info.pipeline_tag,
            dataset_type=info.eval_dataset,
            dataset_name=info.eval_dataset,
            dataset_config=info.eval_dataset_config,
            dataset_split=info.eval_split,
            metric_type=metric,
            metric_value=value,
        )
        for metric, value in info.metrics.items()
    ]


def _body(info: CardInfo, facts: CheckpointFacts, title: str, base_model: str | None) -> str:
    q = facts.quantization
    sparse = q.sparse_modules()
    int8 = q.weights.dtype == "int8"
    lines = [f"# {title}", ""]
    # library_name stays "transformers" (what loads it); the one extra step goes first, where nobody misses it
    lines += [
        "> **Load this model after `import hf_sparse`** (`pip install hf-sparse`). Without that import, transformers "
        "does not know the `hf_sparse` quantization format: it only logs a warning and leaves every compressed "
        "Linear layer randomly initialised, so the model loads but its outputs are garbage.",
        "",
    ]
    origin = f"[{base_model}](https://huggingface.co/{base_model})" if base_model else "a dense model"
    lines.append(
        f"A sparse{' int8' if int8 else ''} version of {origin}, saved with "
        "[hf_sparse](https://github.com/hf-sparse/hf_sparse) in its compressed safetensors format."
    )
    lines += ["", "## Compression", ""]
    if facts.recipe is not None:
        lines.append(f"- Pruning method: `{facts.recipe.method}` ({facts.recipe.schedule} schedule)")
    if sparse:
        lines.append(
            f"- Pattern: `{q.pattern}` on {len(sparse)} Linear modules, stored as `{WeightFormat(next(iter(sparse.values())).format).value}`"
        )
        lines.append(f"- Sparsity of those modules: {q.sparsity:.2%}")
    if int8:
        lines.append("- Weights: int8, symmetric, one scale per output channel")
    else:
        lines.append(f"- Weights: {q.weights.dtype}")
    if q.input_activations is not None:
        lines.append("- Activations of int8 modules: int8, symmetric, one scale per token, computed at run time")
    dense_int8 = [n for n, e in q.modules.items() if e.format == WeightFormat.DENSE.value]
    if dense_int8:
        lines.append(f"- Also stored as dense int8: {', '.join(f'`{n}`' for n in dense_int8)}")
    if facts.float_dtype is not None:
        lines.append(f"- The other floating-point tensors (biases, norms, ...) are stored as {facts.float_dtype}")
    lines += [
        "",
        "| checkpoint | weights size |",
        "|---|---:|",
        f"| dense ({facts.dense_dtype}, tensor data) | {_mb(facts.dense_bytes)} |",
        f"| this checkpoint (safetensors files) | {_mb(facts.checkpoint_bytes)} |",
        f"| ratio | {facts.dense_bytes / max(facts.checkpoint_bytes, 1):.2f}x smaller |",
        "",
        "### Sparsity per layer type",
        "",
        *_sparsity_table(facts),
    ]
    if info.metrics:
        where = info.eval_dataset + (f" ({info.eval_dataset_config})" if info.eval_dataset_config else "")
        where += f", split {info.eval_split}" if info.eval_split else ""
        lines += ["", "## Accuracy", "", f"Measured on {where}.", ""]
        if info.dense_metrics:
            lines += ["| metric | dense | this model | change |", "|---|---:|---:|---:|"]
            for metric, value in info.metrics.items():
                dense = info.dense_metrics.get(metric)
                if dense is None:
                    lines.append(f"| {metric} | | {_fmt(value)} | |")
                else:
                    lines.append(f"| {metric} | {_fmt(dense)} | {_fmt(value)} | {value - dense:+.4g} |")
        else:
            lines += ["| metric | this model |", "|---|---:|"]
            lines += [f"| {metric} | {_fmt(value)} |" for metric, value in info.metrics.items()]
    lines += [
        "",
        "## Usage",
        "",
        "```python",
        "import hf_sparse  # registers the hf_sparse loader with transformers: import it before from_pretrained",
        f"from transformers import {'AutoTokenizer, ' if facts.has_tokenizer else ''}{facts.model_class}",
        "",
        f'model = {facts.model_class}.from_pretrained("{facts.location}")',
    ]
    if facts.has_tokenizer:
        lines += [
            f'tokenizer = AutoTokenizer.from_pretrained("{facts.location}")',
            'outputs = model(**tokenizer("Sparse models run fast on CPUs.", return_tensors="pt"))',
        ]
    lines.append("```")
    if facts.recipe is not None:
        lines += [
            "",
            "## Recipe",
            "",
            "The `SparseConfig` this model was pruned with (also in `sparse_config.json`):",
            "",
            "```json",
            facts.recipe.to_json_string().rstrip(),
            "```",
        ]
    lines += ["", f"Card written by hf_sparse {__version__}.", ""]
    return "\n".join(lines)


def build_model_card(info: CardInfo, facts: CheckpointFacts) -> ModelCard:
    """The card: Hub metadata (YAML) plus a body with the method, sizes, sparsity table, accuracy, usage, recipe."""
    from huggingface_hub import ModelCard, ModelCardData

    q = facts.quantization
    int8 = any(e.dtype == "int8" for e in q.modules.values())
    base_model = info.base_model
    if base_model is None and _HUB_ID.match(facts.name_or_path) and not _looks_local(facts.name_or_path):
        base_model = facts.name_or_path
    relation = info.base_model_relation
    if base_model and relation is None:
        relation = "quantized" if q.weights.dtype == "int8" else "finetune"
    tags = ["hf-sparse", "sparse", "pruned"] + (["int8"] if int8 else [])
    tags += [t for t in [*facts.model_tags, *info.tags] if t not in tags]
    title = info.model_name or (info.repo_id or facts.location).rstrip("/").split("/")[-1]
    metadata: dict[str, Any] = {
        "base_model": base_model,
        "datasets": info.datasets,
        "language": info.language,
        "library_name": "transformers",
        "license": info.license,
        "pipeline_tag": info.pipeline_tag,
        "tags": tags,
        "model_name": title,
        "eval_results": _eval_results(info) if info.metrics else None,
    }
    if relation and base_model:
        metadata["base_model_relation"] = relation
    data = ModelCardData(**metadata)
    # what ModelCard.from_template renders, without needing jinja2
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{_body(info, facts, title, base_model)}")


def _looks_local(name: str) -> bool:
    from pathlib import Path

    return name.startswith((".", "/", "~")) or Path(name).exists()
