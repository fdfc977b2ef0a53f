"""The spec-field → vLLM-flag table (twllm/plan/vllm_flags.py) builds the argv and README's section."""

from __future__ import annotations

from pathlib import Path

import pytest

import twllm
from twllm.plan import vllm_flags
from twllm.plan.build import make_plan
from twllm.plan.placement import GpuInventory
from twllm.plan.vllm_flags import FIELD_FLAGS, PASSED_WHEN, field_flags_argv
from twllm.spec.resolve import RESERVED_FLAGS, parse_spec
from twllm.spec.schema import ModelSpec

README = Path(twllm.__file__).parent.parent / "README.md"
ENV = {"TWLLM_MASTER_KEY": "sk-flags-test"}


def argv_of(model_yaml: str) -> list[str]:
    text = f"name: t\ngateway: {{master_key: '${{TWLLM_MASTER_KEY}}'}}\nmodels:\n  - {model_yaml}\n"
    plan = make_plan(parse_spec(text, "t.yaml", ENV), GpuInventory(8, 80, "test"), Path("/srv/t"))
    return list(plan.engines[0].argv)


def test_readme_section_is_the_tables_rendering() -> None:
    section = vllm_flags.readme_section(README.read_text(encoding="utf-8"))
    assert section is not None, f"README.md lacks the {vllm_flags.BEGIN} … {vllm_flags.END} markers"
    assert section == vllm_flags.markdown().strip(), (
        f"README.md's vLLM-flag section is out of date; regenerate it: {vllm_flags.REGENERATE}"
    )


def test_with_section_replaces_only_between_the_markers() -> None:
    text = f"before\n{vllm_flags.BEGIN}\nstale\n{vllm_flags.END}\nafter\n"
    updated = vllm_flags.with_section(text)
    assert updated.startswith("before\n") and updated.endswith(f"{vllm_flags.END}\nafter\n")
    assert vllm_flags.readme_section(updated) == vllm_flags.markdown().strip()
    assert vllm_flags.with_section(updated) == updated
    with pytest.raises(ValueError, match="markers"):
        vllm_flags.with_section("no markers")


def test_every_entry_is_a_model_field_with_a_meaning() -> None:
    fields = [e.field for e in FIELD_FLAGS]
    flags = [e.flag for e in FIELD_FLAGS]
    assert len(set(fields)) == len(fields) and len(set(flags)) == len(flags)
    for entry in FIELD_FLAGS:
        assert entry.field in ModelSpec.model_fields, entry.field
        assert entry.flag.startswith("--"), entry.flag
        assert entry.when in PASSED_WHEN, entry.when
        assert entry.meaning.strip() and "\n" not in entry.meaning, entry.field


def test_engine_args_may_not_set_a_flag_of_the_table() -> None:
    """The spec stage cannot import the plan's table, so its list of reserved flags is checked here."""
    for entry in FIELD_FLAGS:
        assert RESERVED_FLAGS.get(entry.flag.removeprefix("--")) == entry.field, entry.flag


def test_every_field_reaches_argv_in_table_order() -> None:
    argv = argv_of(
        "{name: m, model: llama-3.3-70b-instruct, tensor_parallel: 2, pipeline_parallel: 2, max_model_len: 4096,"
        " dtype: bfloat16, quantization: fp8, gpu_memory_utilization: 0.85}"
    )
    expected = [
        "--tensor-parallel-size",
        "2",
        "--pipeline-parallel-size",
        "2",
        "--max-model-len",
        "4096",
        "--dtype",
        "bfloat16",
        "--quantization",
        "fp8",
        "--gpu-memory-utilization",
        "0.85",
    ]
    start = argv.index("--tensor-parallel-size")
    assert argv[start : start + len(expected)] == expected


def test_defaults_pass_no_flag() -> None:
    argv = argv_of("{name: m, source: {path: /models/m}, tensor_parallel: 1, dtype: auto}")
    assert not {e.flag for e in FIELD_FLAGS} & set(argv)
    spec = ModelSpec(name="m", source={"path": "/models/m"})
    assert field_flags_argv(spec) == []
