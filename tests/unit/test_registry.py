"""Unit tests for the model registry: the shipped catalog, lookups, and catalog errors."""

from __future__ import annotations

import re
from importlib import resources
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import ValidationError

from twllm.errors import EXIT_INVALID, RegistryError
from twllm.model_registry import ModelEntry, Registry, load_registry

REQUIRED_IDS = {
    "llama-3.1-taide-lx-8b-chat",
    "llama3-taide-lx-8b-chat-alpha1",
    "gemma-3-taide-12b-chat",
    "breeze-7b-instruct-v1.0",
    "llama-breeze2-8b-instruct",
    "llama-3.1-8b-instruct",
    "llama-3.1-70b-instruct",
    "llama-3.2-1b-instruct",
    "llama-3.2-3b-instruct",
    "llama-3.3-70b-instruct",
    "phi-3.5-mini-instruct",
    "phi-4-mini-instruct",
    "phi-4",
    "mistral-7b-instruct-v0.3",
    "mistral-small-24b-instruct-2501",
    "ministral-8b-instruct-2410",
    "bge-m3",
    "multilingual-e5-large",
    "all-minilm-l6-v2",
    "bge-reranker-v2-m3",
    "llama-guard-3-1b",
    "llama-guard-3-8b",
    "llama-prompt-guard-2-86m",
}
FAMILIES = ("breeze", "embedding", "guard", "llama", "mistral", "phi", "rerank", "taide")


def _entry_data(**overrides: Any) -> dict[str, Any]:
    """A valid catalog entry (as written in YAML, without `family`)."""
    data: dict[str, Any] = {
        "id": "tiny-chat",
        "display_name": "Tiny Chat",
        "hf_repo": "example/Tiny-Chat",
        "ollama_tag": None,
        "task": "chat",
        "architecture": "LlamaForCausalLM",
        "context_length": 4096,
        "params_b": 8.0,
        "default_dtype": "bfloat16",
        "engine_args": {},
        "license": "Apache-2.0",
        "gated": False,
        "zh_tw": "test model",
        "source": "https://huggingface.co/example/Tiny-Chat",
    }
    data.update(overrides)
    return data


def _entry(**overrides: Any) -> ModelEntry:
    return ModelEntry.model_validate({"family": "test", **_entry_data(**overrides)})


def _write_catalog(directory: Path, name: str, *entries: dict[str, Any]) -> Path:
    path = directory / name
    path.write_text(
        "# test catalog\n" + yaml.safe_dump({"models": list(entries)}, sort_keys=False),
        encoding="utf-8",
    )
    return path


# --- the shipped catalog ------------------------------------------------------------------


def test_every_required_id_is_present() -> None:
    missing = REQUIRED_IDS - set(load_registry().ids)
    assert not missing, f"missing registry ids: {sorted(missing)}"


def test_families_are_the_catalog_file_stems() -> None:
    registry = load_registry()
    assert registry.families == FAMILIES
    assert registry.get("gemma-3-taide-12b-chat").family == "taide"
    assert registry.get("breeze-7b-instruct-v1.0").family == "breeze"
    assert registry.get("llama-prompt-guard-2-86m").family == "guard"


def test_entries_are_ordered_by_family_then_id() -> None:
    registry = load_registry()
    keys = [(e.family, e.id) for e in registry.entries]
    assert keys == sorted(keys)
    assert registry.ids == tuple(e.id for e in registry.entries)
    assert len(registry) == len(set(registry.ids))


@pytest.mark.parametrize("entry", load_registry().entries, ids=lambda e: e.id)
def test_entry_repo_and_source_are_well_formed(entry: ModelEntry) -> None:
    assert re.fullmatch(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*", entry.hf_repo)
    assert entry.source == f"https://huggingface.co/{entry.hf_repo}"
    assert entry.id == entry.id.lower()
    assert entry.context_length >= 256
    for field in entry.unverified:
        assert field in ModelEntry.model_fields


def test_tasks_are_right() -> None:
    registry = load_registry()
    assert registry.get("bge-m3").task == "embed"
    assert registry.get("multilingual-e5-large").task == "embed"
    assert registry.get("all-minilm-l6-v2").task == "embed"
    assert registry.get("llama-guard-3-1b").task == "guard"
    assert registry.get("llama-guard-3-8b").task == "guard"
    assert registry.get("llama-prompt-guard-2-86m").task == "classify"
    assert registry.get("llama-3.1-taide-lx-8b-chat").task == "chat"
    assert registry.get("bge-reranker-v2-m3").task == "rerank"


def test_embed_models_and_only_they_have_a_dimension() -> None:
    registry = load_registry()
    for entry in registry.entries:
        assert (entry.embedding_dim is not None) == (entry.task == "embed"), entry.id
    assert registry.get("bge-m3").embedding_dim == 1024
    assert registry.get("all-minilm-l6-v2").embedding_dim == 384


def test_serving_defaults_for_known_quirks() -> None:
    registry = load_registry()
    assert registry.get("bge-m3").engine_args == {"runner": "pooling"}
    mistral = registry.get("mistral-small-24b-instruct-2501").engine_args
    assert mistral["tokenizer-mode"] == "mistral"
    assert mistral["enable-auto-tool-choice"] is True
    llama = registry.get("llama-3.1-8b-instruct").engine_args
    assert llama == {"tool-call-parser": "llama3_json", "enable-auto-tool-choice": True}
    for entry in registry.entries:
        assert "task" not in entry.engine_args, f"{entry.id}: vLLM removed --task"


def test_catalog_files_open_with_a_comment() -> None:
    catalog = resources.files("twllm.model_registry") / "catalog"
    names = sorted(f.name for f in catalog.iterdir() if f.name.endswith(".yaml"))
    assert names == [f"{family}.yaml" for family in FAMILIES]
    for name in names:
        assert (catalog / name).read_text(encoding="utf-8").startswith("# "), name


def test_default_registry_is_cached() -> None:
    assert load_registry() is load_registry()


# --- lookups ------------------------------------------------------------------------------


def test_unknown_id_suggests_the_closest() -> None:
    with pytest.raises(RegistryError) as caught:
        load_registry().get("llama-3.1-8b-instruc")
    err = caught.value
    assert "unknown model 'llama-3.1-8b-instruc'" in str(err)
    assert "did you mean 'llama-3.1-8b-instruct'?" in str(err)
    assert err.hint is not None and "twllm models list" in err.hint
    assert err.exit_code == EXIT_INVALID


def test_unknown_id_far_from_everything_has_no_suggestion() -> None:
    with pytest.raises(RegistryError) as caught:
        load_registry().get("zzzzzz")
    assert "did you mean" not in str(caught.value)


def test_find_by_hf_repo_ignores_case() -> None:
    registry = load_registry()
    found = registry.find_by_hf_repo("TAIDE/llama-3.1-taide-lx-8b-chat")
    assert found is not None and found.id == "llama-3.1-taide-lx-8b-chat"
    assert registry.find_by_hf_repo("baai/BGE-M3") is registry.get("bge-m3")
    assert registry.find_by_hf_repo("nobody/nothing") is None


def test_contains_and_iteration() -> None:
    registry = load_registry()
    assert "phi-4" in registry
    assert "phi-5" not in registry
    assert [e.id for e in registry] == list(registry.ids)


# --- ModelEntry ---------------------------------------------------------------------------


def test_weight_gib_math() -> None:
    entry = _entry(params_b=8.0)
    assert entry.weight_gib("bfloat16") == pytest.approx(14.90, abs=0.01)
    assert entry.weight_gib("float16") == entry.weight_gib("bfloat16")
    assert entry.weight_gib("float32") == pytest.approx(29.80, abs=0.01)
    assert entry.weight_gib("fp8") == entry.weight_gib("int8") == pytest.approx(7.45, abs=0.01)
    for dtype in ("int4", "awq", "gptq"):
        assert entry.weight_gib(dtype) == pytest.approx(3.73, abs=0.01)
    assert entry.weight_memory_table() == {"bfloat16": 14.9, "fp8": 7.5, "int4": 3.7}


def test_weight_gib_for_a_real_8b() -> None:
    assert load_registry().get("llama-3.1-8b-instruct").weight_gib("bf16") == pytest.approx(14.9, abs=0.1)


def test_weight_gib_unknown_dtype() -> None:
    with pytest.raises(ValueError, match="unknown dtype 'int3'"):
        _entry().weight_gib("int3")


def test_entry_is_frozen_and_forbids_unknown_fields() -> None:
    entry = _entry()
    with pytest.raises(ValidationError):
        entry.id = "other"
    with pytest.raises(ValidationError, match="extra"):
        _entry(colour="blue")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"id": "Tiny_Chat"}, "lowercase slug"),
        ({"hf_repo": "just-a-name"}, "owner/name"),
        ({"task": "translate"}, "task"),
        ({"engine_args": {"--max-model-len": 4096}}, "kebab-case"),
        ({"task": "embed"}, "embedding_dim"),
        ({"embedding_dim": 384}, "embed models only"),
        ({"unverified": ["colour"]}, "unknown fields"),
        ({"source": "http://example.com"}, "https"),
    ],
)
def test_entry_rejects_bad_values(overrides: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        _entry(**overrides)


# --- catalog loading errors ---------------------------------------------------------------


def test_extra_dir_adds_entries_with_family_from_file_stem(tmp_path: Path) -> None:
    _write_catalog(tmp_path, "local.yaml", _entry_data())
    registry = load_registry([tmp_path])
    assert registry.get("tiny-chat").family == "local"
    assert REQUIRED_IDS <= set(registry.ids)
    assert "local" in registry.families


def test_malformed_entry_names_file_line_and_field(tmp_path: Path) -> None:
    path = _write_catalog(tmp_path, "broken.yaml", _entry_data(), _entry_data(id="bad-one", context_length="lots"))
    with pytest.raises(RegistryError) as caught:
        load_registry([tmp_path])
    message = str(caught.value)
    line = path.read_text().splitlines().index("  context_length: lots") + 1
    assert f"{path}:{line} models[1] (bad-one).context_length:" in message
    assert caught.value.exit_code == EXIT_INVALID


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    broken = _entry_data(id="bad-one", task="sing")
    del broken["license"]
    _write_catalog(tmp_path, "broken.yaml", broken)
    with pytest.raises(RegistryError) as caught:
        load_registry([tmp_path])
    message = str(caught.value)
    assert "models[0] (bad-one).task:" in message
    assert "models[0] (bad-one).license: Field required" in message


def test_family_key_in_catalog_is_rejected(tmp_path: Path) -> None:
    _write_catalog(tmp_path, "fam.yaml", {**_entry_data(), "family": "other"})
    with pytest.raises(RegistryError, match=r"fam\.yaml:\d+ models\[0\] \(tiny-chat\)\.family"):
        load_registry([tmp_path])


@pytest.mark.parametrize(
    "text",
    ["models: {id: x}\n", "entries: []\n", "- just a list\n", "models: []\nextra: 1\n"],
)
def test_wrong_top_level_shape(tmp_path: Path, text: str) -> None:
    (tmp_path / "shape.yaml").write_text(text, encoding="utf-8")
    with pytest.raises(RegistryError, match=r"shape\.yaml: expected a single top-level key"):
        load_registry([tmp_path])


def test_yaml_syntax_error_names_the_file(tmp_path: Path) -> None:
    (tmp_path / "syntax.yaml").write_text("models: [\n  {id: x\n", encoding="utf-8")
    with pytest.raises(RegistryError, match=r"syntax\.yaml: cannot read YAML"):
        load_registry([tmp_path])


def test_duplicate_id_across_files_is_an_error(tmp_path: Path) -> None:
    _write_catalog(tmp_path, "dupe.yaml", _entry_data(id="bge-m3", task="embed", embedding_dim=8))
    with pytest.raises(RegistryError) as caught:
        load_registry([tmp_path])
    message = str(caught.value)
    assert "duplicate model id 'bge-m3'" in message
    assert "dupe.yaml" in message and "embedding.yaml" in message


def test_duplicate_id_within_a_file_is_an_error(tmp_path: Path) -> None:
    _write_catalog(tmp_path, "twice.yaml", _entry_data(), _entry_data())
    with pytest.raises(RegistryError, match=r"twice\.yaml:\d+ models\[1\].*duplicate model id"):
        load_registry([tmp_path])


def test_missing_extra_dir(tmp_path: Path) -> None:
    with pytest.raises(RegistryError, match="catalog directory not found"):
        load_registry([tmp_path / "nope"])


def test_registry_constructor_rejects_duplicates() -> None:
    with pytest.raises(RegistryError, match="duplicate model id 'tiny-chat'"):
        Registry([_entry(), _entry()])
