"""Turns scored answers into per-model figures, two CSV files and a bar chart (PNG)."""

from __future__ import annotations

import csv
import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from twllm.zh_tw.evaluate import Answer

EVAL_CSV = "zh_tw_eval.csv"
SUMMARY_CSV = "zh_tw_summary.csv"
CHART_PNG = "zh_tw_eval.png"
ANSWER_COLUMNS = (
    "model",
    "prompt_id",
    "category",
    "ok",
    "latency_ms",
    "simplified_before",
    "simplified_after",
    "mainland_terms_before",
    "mainland_terms_after",
    "answer_chars",
    "answer",
    "answer_normalized",
    "error",
)


@dataclass(frozen=True)
class ModelSummary:
    """One model's figures. Rates are shares of the model's answers (errors excluded), in [0, 1]."""

    model: str
    prompts: int
    answers: int
    errors: int
    simplified_before: float
    simplified_after: float
    mainland_before: float
    mainland_after: float
    latency_p50_ms: float
    latency_p90_ms: float


def percentile(values: list[float], share: float) -> float:
    """Nearest-rank percentile; NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[max(0, math.ceil(share * len(ordered)) - 1)]


def _share(flags: Iterable[bool], count: int) -> float:
    """The share of true flags among ``count`` answers (NaN when there are none)."""
    return sum(flags) / count if count else math.nan


def summarize(answers: list[Answer]) -> list[ModelSummary]:
    """Per-model figures, in the order the models first appear."""
    models = list(dict.fromkeys(a.model for a in answers))
    summaries = []
    for model in models:
        mine = [a for a in answers if a.model == model]
        good = [a for a in mine if a.ok]
        latencies = [a.latency_s * 1000 for a in good]
        summaries.append(
            ModelSummary(
                model=model,
                prompts=len(mine),
                answers=len(good),
                errors=len(mine) - len(good),
                simplified_before=_share((a.simplified_before for a in good), len(good)),
                simplified_after=_share((a.simplified_after for a in good), len(good)),
                mainland_before=_share((bool(a.mainland_before) for a in good), len(good)),
                mainland_after=_share((bool(a.mainland_after) for a in good), len(good)),
                latency_p50_ms=percentile(latencies, 0.5),
                latency_p90_ms=percentile(latencies, 0.9),
            )
        )
    return summaries


def answer_row(answer: Answer) -> dict[str, object]:
    return {
        "model": answer.model,
        "prompt_id": answer.prompt.id,
        "category": answer.prompt.category,
        "ok": int(answer.ok),
        "latency_ms": round(answer.latency_s * 1000, 1),
        "simplified_before": int(answer.ok and answer.simplified_before),
        "simplified_after": int(answer.ok and answer.simplified_after),
        "mainland_terms_before": ";".join(answer.mainland_before),
        "mainland_terms_after": ";".join(answer.mainland_after),
        "answer_chars": len(answer.text),
        "answer": answer.text,
        "answer_normalized": answer.normalized,
        "error": answer.error or "",
    }


def write_csvs(answers: list[Answer], summaries: list[ModelSummary], out_dir: Path) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    eval_path, summary_path = out_dir / EVAL_CSV, out_dir / SUMMARY_CSV
    with eval_path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=ANSWER_COLUMNS)
        writer.writeheader()
        writer.writerows(answer_row(a) for a in answers)
    with summary_path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=[f.name for f in fields(ModelSummary)])
        writer.writeheader()
        for summary in summaries:
            writer.writerow({k: round(v, 4) if isinstance(v, float) else v for k, v in asdict(summary).items()})
    return eval_path, summary_path


def draw_chart(summaries: list[ModelSummary], path: Path) -> Path:
    """Grouped bars per model: Simplified-answer and mainland-term shares, before and after.

    Labels are ASCII: matplotlib's default font has no CJK glyphs."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    series = (
        ("simplified_before", "Simplified chars, as received", "#d62728"),
        ("simplified_after", "Simplified chars, after normalize", "#ff9896"),
        ("mainland_before", "Mainland terms, as received", "#1f77b4"),
        ("mainland_after", "Mainland terms, after normalize", "#aec7e8"),
    )
    width = 0.2
    figure, axes = plt.subplots(figsize=(max(6.0, 1.8 * len(summaries) + 3), 4.5), dpi=100)
    for offset, (field, label, colour) in enumerate(series):
        xs = [i + (offset - 1.5) * width for i in range(len(summaries))]
        values = [0.0 if math.isnan(getattr(s, field)) else getattr(s, field) * 100 for s in summaries]
        bars = axes.bar(xs, values, width, label=label, color=colour)
        axes.bar_label(bars, fmt="%.0f", fontsize=8)
    axes.set_xticks(range(len(summaries)), [f"{s.model}\n({s.answers} answers)" for s in summaries])
    axes.set_ylabel("share of answers (%)")
    axes.set_ylim(0, 110)
    axes.set_title("zh-TW output: Simplified characters and mainland terms")
    axes.legend(fontsize=8, loc="upper right")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png")
    plt.close(figure)
    return path


def percent(value: float) -> str:
    return "-" if math.isnan(value) else f"{value * 100:.0f}%"


def milliseconds(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.0f}"
