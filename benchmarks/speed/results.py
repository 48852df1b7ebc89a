"""Tables, machine description, and this benchmark's section of benchmarks/RESULTS.md."""

from __future__ import annotations

import platform
import re
import subprocess
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from hf_sparse.utils.io import atomic_file


REPO = Path(__file__).resolve().parents[2]
SECTION_TITLE = "## End-to-end speed: pruned BERT vs PyTorch, ONNX Runtime and DeepSparse (benchmarks/speed)"
BEGIN, END = "<!-- speed:begin -->", "<!-- speed:end -->"
ISA_FLAGS = (
    "avx2",
    "fma",
    "avx_vnni",
    "avx512f",
    "avx512bw",
    "avx512vl",
    "avx512_vnni",
    "avx512_bf16",
    "amx_tile",
    "amx_int8",
    "amx_bf16",
)


@dataclass
class Row:
    """Timing and output check of one engine on one (model, batch)."""

    sparsity: float
    pattern: str
    batch: int
    engine: str
    precision: str
    times_ms: list[float] = field(default_factory=list)
    max_abs_diff: float = float("nan")  # vs the torch fp32 logits
    label_agreement: float = float("nan")
    setup_s: float = float("nan")
    error: str = ""
    info: dict = field(default_factory=dict)  # what the engine reports about itself (kernels, threads, ...)

    @property
    def median_ms(self) -> float:
        if not self.times_ms:
            return float("nan")
        ordered = sorted(self.times_ms)
        mid = len(ordered) // 2
        return ordered[mid] if len(ordered) % 2 else 0.5 * (ordered[mid - 1] + ordered[mid])

    def quantile_ms(self, q: float) -> float:
        if not self.times_ms:
            return float("nan")
        ordered = sorted(self.times_ms)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def cpu_description() -> dict[str, str]:
    model, flags = platform.processor() or "?", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
    except OSError:
        pass
    return {"cpu": model, "isa": " ".join(f for f in ISA_FLAGS if f in flags) or "unknown (no /proc/cpuinfo)"}


def git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "-C", str(REPO), "describe", "--always", "--dirty", "--abbrev=12"],
            capture_output=True,
            text=True,
            check=True,
        )
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _ratio(ref: float, value: float) -> str:
    if not (ref == ref and value == value) or value <= 0:  # NaN-safe
        return "-"
    return f"{ref / value:.2f}x"


def speed_table(rows: list[Row], deepsparse_name: dict[str, str]) -> str:
    """Markdown table. Ratios are speed-ups (reference median / engine median; > 1 means faster than it)."""
    by_key = {(r.sparsity, r.pattern, r.batch, r.engine): r for r in rows}
    lines = [
        "| sparsity | pattern | batch | engine | median ms | p10-p90 ms | n | vs torch_eager | vs DeepSparse "
        "| max abs logit diff | label agree |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        eager = by_key.get((r.sparsity, r.pattern, r.batch, "torch_eager"))
        ds = by_key.get((r.sparsity, r.pattern, r.batch, deepsparse_name.get(r.precision, "")))
        if r.error:
            error = r.error.replace("|", "/")
            lines.append(f"| {r.sparsity:g} | {r.pattern} | {r.batch} | {r.engine} ({r.precision}) | failed: {error} "
                         "| - | 0 | - | - | - | - |")  # fmt: skip
            continue
        lines.append(
            f"| {r.sparsity:g} | {r.pattern} | {r.batch} | {r.engine} ({r.precision}) | {r.median_ms:.2f} "
            f"| {r.quantile_ms(0.1):.1f}-{r.quantile_ms(0.9):.1f} | {len(r.times_ms)} "
            f"| {_ratio(eager.median_ms if eager else float('nan'), r.median_ms)} "
            f"| {_ratio(ds.median_ms if ds else float('nan'), r.median_ms)} "
            f"| {r.max_abs_diff:.2e} | {r.label_agreement:.0%} |"
        )
    return "\n".join(lines)


def profile_table(profiles: list[dict]) -> str:
    lines = [
        "| sparsity | pattern | batch | engine | forward ms | linear ms | attention ms | other ms "
        "| profiling overhead ms | note |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for p in profiles:
        total = p["total_ms"] or float("nan")
        parts = " | ".join(
            f"{p[c + '_ms']:.2f} ({p[c + '_ms'] / total:.0%})" for c in ("linear", "attention", "other")
        )
        overhead = p.get("overhead_ms")
        lines.append(
            f"| {p['sparsity']:g} | {p['pattern']} | {p['batch']} | {p['engine']} | {total:.2f} | {parts} "
            f"| {'-' if overhead is None else f'{overhead:.2f}'} | {p.get('note', '')} |"
        )
    return "\n".join(lines)


def record(results_file: Path, label: str, body: str) -> None:
    """Put `body` under `### label` in this benchmark's section of RESULTS.md, replacing a block of the same label.

    Other sections of the file, and other labels in this one, are kept byte for byte.
    """
    label = label.strip()
    if not label or "\n" in label or "-->" in label:
        raise ValueError(f"--record label {label!r} must be one non-empty line without '-->'")
    text = results_file.read_text(encoding="utf-8") if results_file.is_file() else "# Benchmark results\n"
    if BEGIN not in text:
        text = text.rstrip("\n") + f"\n\n{SECTION_TITLE}\n\n{BEGIN}\n{END}\n"
    head, _, rest = text.partition(BEGIN)
    section, sep, tail = rest.partition(END)
    if not sep:
        raise ValueError(f"{results_file}: found {BEGIN!r} without a matching {END!r}; repair the file by hand")
    open_tag, close_tag = f"<!-- speed-run: {label} -->", f"<!-- /speed-run: {label} -->"
    block = f"{open_tag}\n### {label}\n\n{body.strip()}\n{close_tag}\n"
    pattern = re.compile(re.escape(open_tag) + r".*?" + re.escape(close_tag) + r"\n?", re.DOTALL)
    section = pattern.sub(lambda _: block, section, count=1) if pattern.search(section) else section + block
    if not section.startswith("\n"):
        section = "\n" + section
    with atomic_file(results_file, "w", encoding="utf-8") as f:
        f.write(head + BEGIN + section + END + tail)


def engines_line(rows: list[Row]) -> str:
    """One line naming what each engine reported about itself (first report per engine), or "" if none did."""
    seen: dict[str, dict] = {}
    for r in rows:
        if r.info and r.engine not in seen:
            seen[r.engine] = r.info
    parts = [f"{name} ({', '.join(f'{k} {v}' for k, v in info.items())})" for name, info in seen.items()]
    return "- engines: " + "; ".join(parts) if parts else ""


def run_header(
    command: str, versions: dict[str, str], *, commit: str | None = None, cpu: dict | None = None, when: str = ""
) -> str:
    """The lines that say where a table comes from (defaults: this machine, this checkout, now)."""
    cpu = cpu or cpu_description()
    when = when or datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return "\n".join(
        [
            f"- date: {when}; commit: `{commit or git_commit()}`",
            f"- CPU: {cpu['cpu']}; ISA flags: {cpu['isa']}",
            "- versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()),
            f"- command: `{command}`",
        ]
    )
