"""Offline validation of rendered Kubernetes manifests, for the tests and CI.

``validate_manifest(obj)`` returns a list of error strings (empty when the object is valid);
``validate_all(objs)`` returns ``{"<Kind>/<name>": errors}`` for the objects that have errors, so a
test writes ``assert validate_all(docs) == {}``.

* Built-in kinds (apps/v1 Deployment, v1 Service, autoscaling/v2 HorizontalPodAutoscaler, ...) go
  through the ``kubernetes-validate`` package in strict mode against its bundled Kubernetes
  ``K8S_VERSION`` schemas: unknown fields are errors. Its API raises on the first error it finds, so
  a built-in object gets at most one error per run.
* LeaderWorkerSet, KEDA ScaledObject and prometheus-operator ServiceMonitor are checked with
  ``jsonschema`` against the CRDs vendored in ``tests/k8s_schemas/`` (sources in its README.md),
  made strict the way ``kubectl apply --validate=strict`` is: an object schema with ``properties``
  and no ``x-kubernetes-preserve-unknown-fields`` rejects fields it does not list. CR ``metadata``
  is checked against the same strict ObjectMeta as the built-ins. CEL rules
  (``x-kubernetes-validations``) and ``format`` are not evaluated.
* Every object needs ``apiVersion``, ``kind`` and a non-empty ``metadata.name`` (``kubectl apply``
  needs the name). Any other apiVersion/kind is an error: ``no schema for <apiVersion>/<kind>``.
* kustomize's own files (``kustomize.config.k8s.io``) are not Kubernetes objects:
  ``validate_manifest`` says so, ``validate_all`` skips them.

Nothing here reaches the network: every ``$ref`` resolves inside the installed package or the
vendored files.
"""

from __future__ import annotations

import copy
import functools
import importlib.resources
import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import referencing
import yaml
from jsonschema.protocols import Validator

K8S_VERSION = "1.30.0"
SCHEMA_DIR = Path(__file__).parent / "k8s_schemas"
CRD_FILES = (
    "leaderworkerset.x-k8s.io_leaderworkersets.yaml",
    "keda.sh_scaledobjects.yaml",
    "monitoring.coreos.com_servicemonitors.yaml",
)
KUSTOMIZE_GROUP = "kustomize.config.k8s.io"
# kubernetes-validate's definitions document declares this $id; its own refs are "#/$defs/<name>".
_DEFS_ID = "https://kubernetes.io/api/_definitions.json"
_ELIDED = "x-twllm-elided"  # marks a subtree of a vendored CRD cut out for the same core/v1 type
_MAX_MESSAGE = 400

Schema = dict[str, Any]


def validate_manifest(obj: Any) -> list[str]:
    """The errors in one manifest object (a parsed YAML document); an empty list when it is valid."""
    if not isinstance(obj, Mapping):
        return [f"not a Kubernetes object: expected a mapping, got {type(obj).__name__}"]
    api_version, kind = obj.get("apiVersion"), obj.get("kind")
    if not isinstance(api_version, str) or not api_version or not isinstance(kind, str) or not kind:
        return ["apiVersion and kind must be non-empty strings"]
    if api_version.split("/")[0] == KUSTOMIZE_GROUP:
        return [f"{api_version}/{kind} is a kustomize file, not a Kubernetes object"]
    errors = _name_errors(obj)
    crd_validator = _crd_validators().get((api_version, kind))
    if crd_validator is not None:
        found = sorted(crd_validator.iter_errors(dict(obj)), key=lambda e: [str(p) for p in e.absolute_path])
        return errors + [_format(e.absolute_path, e.message) for e in found]
    try:
        kubernetes_validate.validate(dict(obj), K8S_VERSION, strict=True)
    except kubernetes_validate.SchemaNotFoundError:
        return errors + [f"no schema for {api_version}/{kind}"]
    except kubernetes_validate.ValidationError as e:
        return errors + [_format(e.path, e.message)]
    return errors


def validate_all(objs: Iterable[Any]) -> dict[str, list[str]]:
    """``{"<Kind>/<name>": errors}`` for each object with errors; ``{}`` when all are valid.

    ``None`` (an empty YAML document) and kustomize files are skipped. A key seen twice gets
    ``#<index>`` appended, the index counting every object passed.
    """
    result: dict[str, list[str]] = {}
    for index, obj in enumerate(objs):
        if obj is None:
            continue
        if isinstance(obj, Mapping) and str(obj.get("apiVersion", "")).split("/")[0] == KUSTOMIZE_GROUP:
            continue
        errors = validate_manifest(obj)
        if not errors:
            continue
        key = _key(obj, index)
        if key in result:
            key = f"{key}#{index}"
        result[key] = errors
    return result


def crd_kinds() -> list[tuple[str, str]]:
    """The (apiVersion, kind) pairs checked against vendored CRDs."""
    return sorted(_crd_validators())


# --- internals ---------------------------------------------------------------------------------


def _key(obj: Any, index: int) -> str:
    if not isinstance(obj, Mapping):
        return f"#{index}"
    metadata = obj.get("metadata")
    name = metadata.get("name") if isinstance(metadata, Mapping) else None
    return f"{obj.get('kind') or '?'}/{name or '#' + str(index)}"


def _name_errors(obj: Mapping[str, Any]) -> list[str]:
    metadata = obj.get("metadata")
    if not isinstance(metadata, Mapping) or not isinstance(metadata.get("name"), str) or not metadata["name"]:
        return ["metadata.name: required (a non-empty string)"]
    return []


def _format(path: Iterable[Any], message: str) -> str:
    where = ""
    for part in path:
        where += f"[{part}]" if isinstance(part, int) else (f".{part}" if where else str(part))
    if len(message) > _MAX_MESSAGE:
        message = message[:_MAX_MESSAGE] + "..."
    return f"{where or '<root>'}: {message}"


@functools.cache
def _k8s_definitions() -> Schema:
    """kubernetes-validate's strict definitions for K8S_VERSION (ObjectMeta, PodSpec, ...)."""
    path = (
        importlib.resources.files("kubernetes_validate")
        / "kubernetes-json-schema"
        / f"v{K8S_VERSION}-local-strict"
        / "_definitions.json"
    )
    definitions: Schema = json.loads(path.read_text(encoding="utf-8"))
    if definitions.get("$id") != _DEFS_ID:
        raise RuntimeError(f"unexpected $id in {path}: {definitions.get('$id')!r}")
    return definitions


def _k8s_ref(definition: str) -> Schema:
    if definition not in _k8s_definitions()["$defs"]:
        raise KeyError(f"kubernetes-validate {K8S_VERSION} has no definition {definition}")
    return {"$ref": f"{_DEFS_ID}#/$defs/{definition}"}


def strict_schema(node: Any) -> Any:
    """A CRD openAPIV3Schema node turned into a strict JSON Schema (a new object; recursive).

    * ``properties`` without ``x-kubernetes-preserve-unknown-fields: true`` (and without an
      ``additionalProperties`` of its own) gets ``additionalProperties: false``;
    * ``x-kubernetes-embedded-resource`` objects also accept apiVersion, kind and metadata;
    * ``x-kubernetes-int-or-string`` without an ``anyOf`` accepts an integer or a string;
    * ``nullable: true`` adds ``null`` to ``type``;
    * an ``x-twllm-elided: <definition>`` node becomes a ``$ref`` to that kubernetes-validate
      definition (already strict).
    Subschemas under anyOf/allOf/oneOf/not are value checks in a structural CRD schema and are
    left as they are.
    """
    if not isinstance(node, dict):
        return node
    if _ELIDED in node:
        return {**_k8s_ref(node[_ELIDED]), "description": node.get("description", "")}
    out = copy.copy(node)
    if "properties" in node:
        out["properties"] = {name: strict_schema(sub) for name, sub in node["properties"].items()}
        if node.get("x-kubernetes-embedded-resource"):
            for name, sub in (("apiVersion", {"type": "string"}), ("kind", {"type": "string"})):
                out["properties"].setdefault(name, sub)
            out["properties"].setdefault("metadata", _k8s_ref("io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"))
        if not node.get("x-kubernetes-preserve-unknown-fields") and "additionalProperties" not in node:
            out["additionalProperties"] = False
    if isinstance(node.get("additionalProperties"), dict):
        out["additionalProperties"] = strict_schema(node["additionalProperties"])
    if isinstance(node.get("items"), dict):
        out["items"] = strict_schema(node["items"])
    if node.get("x-kubernetes-int-or-string") and "anyOf" not in node:
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if node.get("nullable") and isinstance(node.get("type"), str):
        out["type"] = [node["type"], "null"]
    return out


@functools.cache
def _crd_validators() -> dict[tuple[str, str], Validator]:
    definitions = _k8s_definitions()
    registry: referencing.Registry[Any] = referencing.Registry().with_resource(
        _DEFS_ID, referencing.Resource.from_contents(definitions)
    )
    validators: dict[tuple[str, str], Validator] = {}
    for file_name in CRD_FILES:
        documents = [d for d in yaml.safe_load_all((SCHEMA_DIR / file_name).read_text(encoding="utf-8")) if d]
        (crd,) = documents
        if crd.get("kind") != "CustomResourceDefinition":
            raise ValueError(f"{file_name}: not a CustomResourceDefinition")
        group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
        for version in crd["spec"]["versions"]:
            if not version.get("served"):
                continue
            schema = strict_schema(version["schema"]["openAPIV3Schema"])
            # The API server validates a custom resource's metadata as ObjectMeta, whatever the CRD says.
            schema["properties"]["metadata"] = _k8s_ref("io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta")
            api_version = f"{group}/{version['name']}"
            schema["properties"]["apiVersion"] = {"const": api_version}
            schema["properties"]["kind"] = {"const": kind}
            schema["required"] = sorted({*schema.get("required", []), "apiVersion", "kind"})
            jsonschema.Draft202012Validator.check_schema(schema)
            validators[(api_version, kind)] = jsonschema.Draft202012Validator(schema, registry=registry)
    return validators
