"""Summaries of a load-test run: p50/p90/p99 per metric per model, error rate, throughput, a PNG chart.

Percentiles come from the samples file the locust users write (exact times); the request and
failure counts are checked against locust's own ``<prefix>_stats.csv``, which holds the same
metrics with locust's rounding (two significant digits above 100 ms).
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

METRICS = ("e2el", "ttft", "itl", "tpot")
"""vLLM's names, lower case: end-to-end latency, time to first token, inter-token latency, time per output token."""
PERCENTILES = (50, 90, 99)


def percentile(values: list[float], p: float) -> float | None:
    """The p-th percentile with linear interpolation between ranks (numpy's default)."""
    if not values:
        return None
    ordered = sorted(values)
    rank = (len(ordered) - 1) * p / 100
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


@dataclass
class ModelSummary:
    """One model's figures in one run."""

    model: str
    kind: str
    requests: int
    errors: int
    duration_s: float
    output_tokens: int
    latency_ms: dict[str, dict[str, float | None]] = field(default_factory=dict)
    """metric → {"p50": …, "p90": …, "p99": …, "mean": …} (ms)."""
    error_examples: list[str] = field(default_factory=list)

    @property
    def error_rate(self) -> float:
        return self.errors / self.requests if self.requests else 0.0

    @property
    def requests_per_s(self) -> float:
        return (self.requests - self.errors) / self.duration_s if self.duration_s > 0 else 0.0

    @property
    def output_tokens_per_s(self) -> float:
        return self.output_tokens / self.duration_s if self.duration_s > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "error_rate": self.error_rate,
            "requests_per_s": self.requests_per_s,
            "output_tokens_per_s": self.output_tokens_per_s,
        }


def read_samples(path: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(the run header, the samples) of a samples file."""
    header: dict[str, Any] = {}
    samples = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        record = json.loads(line)
        if record.get("kind") == "run":
            header = record
        else:
            samples.append(record)
    return header, samples


def summarize(samples: list[dict[str, Any]], duration_s: float) -> list[ModelSummary]:
    """Per model (in first-seen order): counts, output tokens and latency percentiles of successes."""
    by_model: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for s in samples:
        by_model.setdefault((s["kind"], s["model"]), []).append(s)
    out = []
    for (kind, model), items in by_model.items():
        good = [s for s in items if s["ok"]]
        values = {
            "e2el": [s["e2el_ms"] for s in good],
            "ttft": [s["ttft_ms"] for s in good if s.get("ttft_ms") is not None],
            "itl": [gap for s in good for gap in s.get("itl_ms") or ()],
            "tpot": [s["tpot_ms"] for s in good if s.get("tpot_ms") is not None],
        }
        latency = {
            name: {**{f"p{p}": percentile(v, p) for p in PERCENTILES}, "mean": sum(v) / len(v) if v else None}
            for name, v in values.items()
            if v
        }
        errors = [s.get("error") or f"HTTP {s.get('status')}" for s in items if not s["ok"]]
        out.append(
            ModelSummary(
                model=model,
                kind=kind,
                requests=len(items),
                errors=len(errors),
                duration_s=duration_s,
                output_tokens=sum(int(s.get("output_tokens") or 0) for s in good),
                latency_ms=latency,
                error_examples=sorted(set(errors))[:3],
            )
        )
    return out


def summarize_file(path: Path) -> list[ModelSummary]:
    header, samples = read_samples(path)
    duration = float(header.get("stopped", 0) or 0) - float(header.get("started", 0) or 0)
    return summarize(samples, duration)


def locust_counts(csv_prefix: Path) -> dict[str, dict[str, int]]:
    """From locust's ``<prefix>_stats.csv``: "<type> <name>" → {"requests": …, "failures": …}."""
    path = Path(f"{csv_prefix}_stats.csv")
    counts = {}
    with path.open(newline="", encoding="utf-8") as handle:
        for row in csv.DictReader(handle):
            if row.get("Name") == "Aggregated":
                continue
            counts[f"{row['Type']} {row['Name']}"] = {
                "requests": int(row["Request Count"]),
                "failures": int(row["Failure Count"]),
            }
    return counts


# --- text ---------------------------------------------------------------------------------------


def _ms(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.1f}" if value < 1000 else f"{value:.0f}"


def table(summaries: list[ModelSummary]) -> str:
    """A plain-text table: one row per model and metric, then throughput and errors per model."""
    head = f"{'model':<24}{'metric':<8}{'p50 ms':>10}{'p90 ms':>10}{'p99 ms':>10}{'mean ms':>10}"
    lines = [head, "-" * len(head)]
    for s in summaries:
        for metric in METRICS:
            if metric in s.latency_ms:
                m = s.latency_ms[metric]
                lines.append(
                    f"{s.model:<24}{metric.upper():<8}{_ms(m['p50']):>10}{_ms(m['p90']):>10}"
                    f"{_ms(m['p99']):>10}{_ms(m['mean']):>10}"
                )
    lines.append("")
    head2 = f"{'model':<24}{'kind':<7}{'requests':>9}{'errors':>8}{'error %':>9}{'req/s':>9}{'out tok/s':>11}"
    lines += [head2, "-" * len(head2)]
    for s in summaries:
        lines.append(
            f"{s.model:<24}{s.kind:<7}{s.requests:>9}{s.errors:>8}{s.error_rate * 100:>9.2f}"
            f"{s.requests_per_s:>9.2f}{s.output_tokens_per_s:>11.1f}"
        )
    for s in summaries:
        for example in s.error_examples:
            lines.append(f"  {s.model} error: {example}")
    return "\n".join(lines)


# --- chart --------------------------------------------------------------------------------------


def chart(summaries: list[ModelSummary], path: Path, title: str = "twllm load test") -> Path:
    """A PNG: p50/p90/p99 of each latency metric per model, and output tokens/s per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [m for m in METRICS if any(m in s.latency_ms for s in summaries)]
    fig, axes = plt.subplots(1, len(metrics) + 1, figsize=(4 * (len(metrics) + 1), 4), squeeze=False)
    width = 0.8 / max(1, len(summaries))
    for ax, metric in zip(axes[0], metrics):
        for i, s in enumerate(summaries):
            values = [(s.latency_ms.get(metric) or {}).get(f"p{p}") or 0.0 for p in PERCENTILES]
            ax.bar([x + i * width for x in range(len(PERCENTILES))], values, width, label=s.model)
        ax.set_xticks(
            [x + width * (len(summaries) - 1) / 2 for x in range(len(PERCENTILES))], [f"p{p}" for p in PERCENTILES]
        )
        ax.set_title(f"{metric.upper()} (ms)")
    ax = axes[0][-1]
    ax.bar(range(len(summaries)), [s.output_tokens_per_s for s in summaries], color="tab:green")
    ax.set_xticks(range(len(summaries)), [s.model for s in summaries], rotation=20)
    ax.set_title("output tokens/s")
    if summaries:
        axes[0][0].legend(fontsize="small")
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
