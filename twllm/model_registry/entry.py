"""ModelEntry: one model the registry knows — where its weights live, how to serve it, its limits.

Entries are data, written in `catalog/<family>.yaml` and validated here. Every field carries its
description so the catalog's meaning is written down once. Facts an entry could not confirm
from the model's own card or config are named in `unverified`.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

Task = Literal["chat", "embed", "rerank", "guard", "classify"]
DType = Literal["bfloat16", "float16", "float32"]
EngineArgValue = str | int | float | bool

_ID_RE = re.compile(r"^[a-z0-9]+(?:[.-][a-z0-9]+)*$")
_HF_REPO_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
_FLAG_RE = re.compile(r"^[a-z0-9]+(?:-[a-z0-9]+)*$")

#: Bytes per parameter for the weight-memory estimate, by dtype or quantisation name.
BYTES_PER_PARAM: dict[str, float] = {
    "float32": 4.0,
    "fp32": 4.0,
    "bfloat16": 2.0,
    "bf16": 2.0,
    "float16": 2.0,
    "fp16": 2.0,
    "fp8": 1.0,
    "int8": 1.0,
    "int4": 0.5,
    "awq": 0.5,
    "gptq": 0.5,
}

#: The dtypes `weight_memory_table` reports, in order.
TABLE_DTYPES: tuple[str, ...] = ("bfloat16", "fp8", "int4")


class ModelEntry(BaseModel):
    """One model in the registry: identity, serving defaults, limits, licence and provenance."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    id: str = Field(
        description="Stable registry id, a lowercase slug (e.g. 'llama-3.1-taide-lx-8b-chat'); "
        "what a spec's `model:` names."
    )
    family: str = Field(
        description="Catalog family: the stem of the catalog file the entry comes from "
        "(filled by the loader, never written in the catalog)."
    )
    display_name: str = Field(description="Human-readable name for listings.")
    hf_repo: str = Field(
        description="Exact Hugging Face repository id, 'owner/name' (e.g. 'taide/Llama-3.1-TAIDE-LX-8B-Chat')."
    )
    ollama_tag: str | None = Field(
        default=None,
        description="Official Ollama library tag (e.g. 'llama3.1:8b'); None where the library "
        "has no well-known tag for this model.",
    )
    task: Task = Field(
        description="What the model does: 'chat' (generation), 'embed' (embeddings), "
        "'rerank' (cross-encoder scoring query-document pairs, served at /v1/rerank and /score), "
        "'guard' (Llama Guard-style safety classifier that generates a verdict), "
        "'classify' (sequence classifier such as Prompt Guard)."
    )
    architecture: str = Field(description="`architectures[0]` of the model's HF config (e.g. 'LlamaForCausalLM').")
    context_length: int = Field(gt=0, description="Maximum context in tokens, per the model card or config.")
    params_b: float = Field(gt=0, description="Parameter count in billions.")
    default_dtype: DType = Field(description="Dtype the published weights are stored in.")
    embedding_dim: int | None = Field(default=None, gt=0, description="Output vector size; set for embed models only.")
    engine_args: dict[str, EngineArgValue] = Field(
        default_factory=dict,
        description="Default vLLM flags: kebab-case names without leading dashes, "
        "e.g. {'tool-call-parser': 'llama3_json', 'enable-auto-tool-choice': True}; "
        "True means a bare switch.",
    )
    chat_template_notes: str | None = Field(
        default=None,
        description="Quirks of the chat template (no system role, strict alternation, ...).",
    )
    license: str = Field(description="Licence the weights are released under.")
    gated: bool = Field(description="Whether the HF repo requires accepting terms before download.")
    zh_tw: str = Field(description="Short note on Traditional Chinese / Taiwan usage of this model.")
    source: str = Field(description="URL of the model card the facts come from.")
    unverified: list[str] = Field(
        default_factory=list,
        description="Names of fields whose value could not be confirmed from the model's own card or config.",
    )

    @field_validator("id", "family")
    @classmethod
    def _slug(cls, value: str) -> str:
        if not _ID_RE.match(value):
            raise ValueError(f"'{value}' is not a lowercase slug (letters, digits, '.' and '-' between them)")
        return value

    @field_validator("hf_repo")
    @classmethod
    def _owner_slash_name(cls, value: str) -> str:
        if not _HF_REPO_RE.match(value):
            raise ValueError(f"'{value}' is not a Hugging Face repo id of the form 'owner/name'")
        return value

    @field_validator("engine_args")
    @classmethod
    def _kebab_flags(cls, value: dict[str, EngineArgValue]) -> dict[str, EngineArgValue]:
        bad = [name for name in value if not _FLAG_RE.match(name)]
        if bad:
            raise ValueError(f"flag names must be kebab-case without leading dashes: {', '.join(bad)}")
        return value

    @field_validator("source")
    @classmethod
    def _https_url(cls, value: str) -> str:
        if not value.startswith("https://"):
            raise ValueError(f"'{value}' is not an https:// URL")
        return value

    @model_validator(mode="after")
    def _cross_field_rules(self) -> ModelEntry:
        if self.task == "embed" and self.embedding_dim is None:
            raise ValueError("embed models need embedding_dim")
        if self.task != "embed" and self.embedding_dim is not None:
            raise ValueError(f"embedding_dim is for embed models only (task is '{self.task}')")
        unknown = [name for name in self.unverified if name not in type(self).model_fields]
        if unknown:
            raise ValueError(f"unverified names unknown fields: {', '.join(unknown)}")
        return self

    def weight_gib(self, dtype: str) -> float:
        """Memory for the weights alone in GiB at `dtype` (no KV cache, activations or overhead)."""
        try:
            per_param = BYTES_PER_PARAM[dtype.lower()]
        except KeyError:
            known = ", ".join(sorted(BYTES_PER_PARAM))
            raise ValueError(f"unknown dtype '{dtype}'; known: {known}") from None
        return self.params_b * 1e9 * per_param / 2**30

    def weight_memory_table(self) -> dict[str, float]:
        """Weight memory in GiB for bfloat16, fp8 and int4, rounded to 0.1."""
        return {dtype: round(self.weight_gib(dtype), 1) for dtype in TABLE_DTYPES}
