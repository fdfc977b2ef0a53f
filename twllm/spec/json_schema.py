"""The JSON Schema of the spec, generated from the pydantic models (never written by hand)."""

from __future__ import annotations

from typing import Any

from twllm.spec.schema import Spec

SCHEMA_ID = "https://github.com/twllm/twllm/schema/spec.json"


def spec_json_schema() -> dict[str, Any]:
    """JSON Schema (draft 2020-12) of a deployment file."""
    schema = Spec.model_json_schema(mode="validation")
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", "$id": SCHEMA_ID, **schema}
