"""The one table from a model's spec fields to `vllm serve` flags: the plan builds argv from it,
README.md's "Spec field → vLLM flag" section is rendered from it.

Following a field from YAML to argv: ``ModelSpec.tensor_parallel`` (twllm/spec/schema.py) →
its ``FieldFlag`` in ``FIELD_FLAGS`` below → ``field_flags_argv`` called by the plan's
``_vllm_process``. Flags not in the table: the weights (positional), ``--served-model-name``,
``--host``, ``--port`` (set by the plan) and ``engine_args`` (any other flag, passed through).

Regenerate README.md's section after changing the table: ``python -m twllm.plan.vllm_flags``.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PASSED_WHEN: dict[str, Callable[[Any], bool]] = {
    "set": lambda value: value is not None,
    "above 1": lambda value: value is not None and value > 1,
    "not auto": lambda value: value != "auto",
}
"""When a field's flag is passed, by name; otherwise vLLM's own default applies."""


@dataclass(frozen=True)
class FieldFlag:
    """One model field (ModelSpec attribute) and the `vllm serve` flag it becomes."""

    field: str
    flag: str
    when: str
    """A key of PASSED_WHEN: when the value is passed (``--flag <value>``)."""
    meaning: str

    def argv(self, spec: Any) -> list[str]:
        """``[flag, value]`` when this field of ``spec`` (a ModelSpec) is passed, else ``[]``."""
        value = getattr(spec, self.field)
        return [self.flag, str(value)] if PASSED_WHEN[self.when](value) else []


FIELD_FLAGS: tuple[FieldFlag, ...] = (
    FieldFlag(
        "tensor_parallel",
        "--tensor-parallel-size",
        "above 1",
        "GPUs one copy of the weights is split across.",
    ),
    FieldFlag("pipeline_parallel", "--pipeline-parallel-size", "above 1", "Pipeline stages one copy is split into."),
    FieldFlag("max_model_len", "--max-model-len", "set", "Context length served; at most the model's own."),
    FieldFlag("dtype", "--dtype", "not auto", "Weight and activation type."),
    FieldFlag("quantization", "--quantization", "set", "Quantisation method of the weights."),
    FieldFlag(
        "gpu_memory_utilization",
        "--gpu-memory-utilization",
        "set",
        "Share of each GPU's memory vLLM may take (vLLM's default 0.9).",
    ),
)
"""In argv order."""


def field_flags_argv(spec: Any) -> list[str]:
    """The flags ``spec`` (a ModelSpec) sets, in table order."""
    return [part for entry in FIELD_FLAGS for part in entry.argv(spec)]


# --- README.md ----------------------------------------------------------------------------------

BEGIN = "<!-- vllm-flags:begin -->"
END = "<!-- vllm-flags:end -->"
REGENERATE = "python -m twllm.plan.vllm_flags"


def markdown() -> str:
    """The table as README.md shows it, between (not including) the markers."""
    lines = [
        f"<!-- generated from twllm/plan/vllm_flags.py by `{REGENERATE}`; edit the table there -->",
        "",
        "| Model field | `vllm serve` flag | Passed when | Meaning |",
        "|---|---|---|---|",
        *(f"| `{e.field}` | `{e.flag}` | {e.when} | {e.meaning} |" for e in FIELD_FLAGS),
        "",
        "Always passed: the weights, `--served-model-name <name>`, `--host` (`engines.host`) and "
        "`--port`. `engine_args` adds any other flag; it may not set one of these.",
    ]
    return "\n".join(lines)


def readme_section(readme: str) -> str | None:
    """What README.md holds between the markers (stripped), or None without them."""
    start, end = readme.find(BEGIN), readme.find(END)
    if start < 0 or end < start:
        return None
    return readme[start + len(BEGIN) : end].strip()


def with_section(readme: str) -> str:
    """README.md's text with the section between the markers replaced by ``markdown()``."""
    start, end = readme.find(BEGIN), readme.find(END)
    if start < 0 or end < start:
        raise ValueError(f"README.md has no {BEGIN} … {END} markers")
    return readme[: start + len(BEGIN)] + "\n" + markdown() + "\n" + readme[end:]


def main(argv: list[str]) -> int:
    """Rewrite the section in README.md (or the file given)."""
    path = Path(argv[0] if argv else "README.md")
    text = path.read_text(encoding="utf-8")
    updated = with_section(text)
    if updated != text:
        path.write_text(updated, encoding="utf-8")
        print(f"{path}: section updated", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
