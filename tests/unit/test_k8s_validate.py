"""The offline manifest validator (tests/k8s_validate.py) catches what a strict API server rejects."""

from __future__ import annotations

import copy
import socket
from pathlib import Path
from typing import Any

import pytest
import yaml
from k8s_validate import (
    CRD_FILES,
    K8S_VERSION,
    SCHEMA_DIR,
    _crd_validators,
    _k8s_definitions,
    crd_kinds,
    strict_schema,
    validate_all,
    validate_manifest,
)

LABELS = {"app.kubernetes.io/name": "twllm", "app.kubernetes.io/component": "gateway"}
POD_SPEC: dict[str, Any] = {
    "serviceAccountName": "twllm",
    "containers": [
        {
            "name": "gateway",
            "image": "ghcr.io/example/twllm:0.1.0",
            "imagePullPolicy": "IfNotPresent",
            "args": ["gateway", "--port", "4000"],
            "ports": [{"name": "http", "containerPort": 4000}],
            "env": [{"name": "TWLLM_MASTER_KEY", "valueFrom": {"secretKeyRef": {"name": "twllm", "key": "master"}}}],
            "resources": {"requests": {"cpu": "500m", "memory": "1Gi"}, "limits": {"nvidia.com/gpu": 1}},
            "readinessProbe": {"httpGet": {"path": "/health/readiness", "port": "http"}},
        }
    ],
}


def meta(name: str = "twllm-gateway") -> dict[str, Any]:
    return {"name": name, "namespace": "twllm", "labels": dict(LABELS), "annotations": {"twllm/spec-hash": "abc"}}


def deployment() -> dict[str, Any]:
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": meta(),
        "spec": {
            "replicas": 2,
            "selector": {"matchLabels": dict(LABELS)},
            "template": {"metadata": {"labels": dict(LABELS)}, "spec": copy.deepcopy(POD_SPEC)},
        },
    }


def leaderworkerset() -> dict[str, Any]:
    return {
        "apiVersion": "leaderworkerset.x-k8s.io/v1",
        "kind": "LeaderWorkerSet",
        "metadata": meta("vllm-llama-70b"),
        "spec": {
            "replicas": 1,
            "startupPolicy": "LeaderCreated",
            "leaderWorkerTemplate": {
                "size": 2,
                "restartPolicy": "RecreateGroupOnPodRestart",
                "leaderTemplate": {"metadata": {"labels": {"role": "leader"}}, "spec": copy.deepcopy(POD_SPEC)},
                "workerTemplate": {"spec": copy.deepcopy(POD_SPEC)},
            },
        },
    }


def scaledobject() -> dict[str, Any]:
    return {
        "apiVersion": "keda.sh/v1alpha1",
        "kind": "ScaledObject",
        "metadata": meta("twllm-gateway"),
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "twllm-gateway"},
            "minReplicaCount": 1,
            "maxReplicaCount": 4,
            "triggers": [
                {
                    "type": "prometheus",
                    "metadata": {
                        "serverAddress": "http://prometheus:9090",
                        "query": "sum(rate(twllm_requests_total[1m]))",
                        "threshold": "50",
                    },
                }
            ],
        },
    }


def servicemonitor() -> dict[str, Any]:
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "ServiceMonitor",
        "metadata": meta("twllm-gateway"),
        "spec": {
            "selector": {"matchLabels": dict(LABELS)},
            "endpoints": [{"port": "http", "path": "/metrics", "interval": "30s"}],
        },
    }


def builtins() -> list[dict[str, Any]]:
    """One valid object of each built-in kind `twllm render k8s` writes."""
    pod_template = {"metadata": {"labels": dict(LABELS)}, "spec": copy.deepcopy(POD_SPEC)}
    return [
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "twllm"}},
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": meta("twllm")},
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta("twllm"), "data": {"config.yaml": "a: 1\n"}},
        {"apiVersion": "v1", "kind": "Secret", "metadata": meta("twllm"), "type": "Opaque", "stringData": {"k": "v"}},
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": meta(),
            "spec": {"selector": dict(LABELS), "ports": [{"name": "http", "port": 80, "targetPort": "http"}]},
        },
        deployment(),
        {
            "apiVersion": "apps/v1",
            "kind": "StatefulSet",
            "metadata": meta("postgres"),
            "spec": {
                "serviceName": "postgres",
                "selector": {"matchLabels": dict(LABELS)},
                "template": pod_template,
                "volumeClaimTemplates": [
                    {
                        "metadata": {"name": "data"},
                        "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "10Gi"}}},
                    }
                ],
            },
        },
        {
            "apiVersion": "autoscaling/v2",
            "kind": "HorizontalPodAutoscaler",
            "metadata": meta(),
            "spec": {
                "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "twllm-gateway"},
                "minReplicas": 2,
                "maxReplicas": 8,
                "metrics": [
                    {
                        "type": "Resource",
                        "resource": {"name": "cpu", "target": {"type": "Utilization", "averageUtilization": 70}},
                    }
                ],
            },
        },
        {
            "apiVersion": "policy/v1",
            "kind": "PodDisruptionBudget",
            "metadata": meta(),
            "spec": {"minAvailable": 1, "selector": {"matchLabels": dict(LABELS)}},
        },
        {
            "apiVersion": "networking.k8s.io/v1",
            "kind": "NetworkPolicy",
            "metadata": meta(),
            "spec": {
                "podSelector": {"matchLabels": dict(LABELS)},
                "policyTypes": ["Ingress"],
                "ingress": [{"ports": [{"protocol": "TCP", "port": 4000}]}],
            },
        },
        {
            "apiVersion": "batch/v1",
            "kind": "Job",
            "metadata": meta("twllm-migrate"),
            "spec": {"backoffLimit": 2, "template": {"spec": {**copy.deepcopy(POD_SPEC), "restartPolicy": "Never"}}},
        },
        {
            "apiVersion": "v1",
            "kind": "PersistentVolumeClaim",
            "metadata": meta("models"),
            "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "200Gi"}}},
        },
    ]


CUSTOM = {"LeaderWorkerSet": leaderworkerset, "ScaledObject": scaledobject, "ServiceMonitor": servicemonitor}


# --- built-in kinds (kubernetes-validate, strict) ----------------------------------------------


@pytest.mark.parametrize("obj", builtins(), ids=lambda o: o["kind"])
def test_valid_builtin_objects_pass(obj):
    assert validate_manifest(obj) == []


def test_deployment_with_an_unknown_field_fails_in_strict_mode():
    obj = deployment()
    obj["spec"]["template"]["spec"]["containers"][0]["imagePullPolicyy"] = "Always"
    errors = validate_manifest(obj)
    assert len(errors) == 1
    assert errors[0].startswith("spec.template.spec.containers[0]: ")
    assert "'imagePullPolicyy' was unexpected" in errors[0]


def test_deployment_with_a_wrong_type_fails():
    obj = deployment()
    obj["spec"]["replicas"] = "2"
    assert validate_manifest(obj) == ["spec.replicas: '2' is not of type 'integer', 'null'"]


def test_builtin_with_an_apiversion_that_does_not_serve_the_kind_fails():
    obj = deployment()
    obj["apiVersion"] = "extensions/v1beta1"  # removed in 1.16
    assert validate_manifest(obj) == ["no schema for extensions/v1beta1/Deployment"]


def test_hpa_v2_fields_are_checked():
    (hpa,) = [o for o in builtins() if o["kind"] == "HorizontalPodAutoscaler"]
    hpa["spec"]["metrics"][0]["resource"]["target"]["averageUtilisation"] = 70
    assert "'averageUtilisation' was unexpected" in validate_manifest(hpa)[0]


# --- custom resources (vendored CRDs, strict) --------------------------------------------------


@pytest.mark.parametrize("kind", sorted(CUSTOM))
def test_valid_custom_resources_pass(kind):
    assert validate_manifest(CUSTOM[kind]()) == []


@pytest.mark.parametrize(
    ("kind", "path", "field"),
    [
        ("LeaderWorkerSet", ("spec",), "replica"),
        ("LeaderWorkerSet", ("spec", "leaderWorkerTemplate"), "sizee"),
        ("ScaledObject", ("spec",), "minReplicas"),
        ("ScaledObject", ("spec", "triggers", 0), "metaData"),
        ("ServiceMonitor", ("spec",), "endpoint"),
        ("ServiceMonitor", ("spec", "endpoints", 0), "scrapeInterval"),
    ],
)
def test_custom_resource_with_an_unknown_field_fails(kind, path, field):
    obj = CUSTOM[kind]()
    node: Any = obj
    for part in path:
        node = node[part]
    node[field] = 1
    where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in path).lstrip(".")
    assert validate_manifest(obj) == [f"{where}: Additional properties are not allowed ('{field}' was unexpected)"]


@pytest.mark.parametrize(
    ("kind", "path", "value", "message"),
    [
        ("LeaderWorkerSet", ("spec", "replicas"), "1", "'1' is not of type 'integer'"),
        ("LeaderWorkerSet", ("spec", "startupPolicy"), "LeaderStarted", "'LeaderStarted' is not one of"),
        ("ScaledObject", ("spec", "maxReplicaCount"), "4", "'4' is not of type 'integer'"),
        # KEDA trigger metadata is a map of strings: an unquoted YAML number is rejected by the API server.
        ("ScaledObject", ("spec", "triggers", 0, "metadata", "threshold"), 50, "50 is not of type 'string'"),
        ("ServiceMonitor", ("spec", "endpoints", 0, "interval"), "30 seconds", "does not match"),
        ("ServiceMonitor", ("spec", "endpoints"), {"port": "http"}, "is not of type 'array'"),
    ],
)
def test_custom_resource_with_a_wrong_type_or_value_fails(kind, path, value, message):
    obj = CUSTOM[kind]()
    node: Any = obj
    for part in path[:-1]:
        node = node[part]
    node[path[-1]] = value
    errors = validate_manifest(obj)
    assert len(errors) == 1 and message in errors[0], errors


def test_custom_resource_missing_a_required_field_fails():
    obj = scaledobject()
    del obj["spec"]["scaleTargetRef"]
    assert validate_manifest(obj) == ["spec: 'scaleTargetRef' is a required property"]


def test_leaderworkerset_pod_templates_are_checked_as_strictly_as_a_deployments():
    obj = leaderworkerset()
    template = obj["spec"]["leaderWorkerTemplate"]
    template["workerTemplate"]["spec"]["containers"][0]["imagePullPolicyy"] = "Always"
    template["leaderTemplate"]["spec"]["containers"][0]["resources"]["limits"]["cpu"] = ["1"]
    errors = validate_manifest(obj)
    assert len(errors) == 2, errors
    assert errors[0].startswith("spec.leaderWorkerTemplate.leaderTemplate.spec.containers[0].resources.limits.cpu: ")
    assert errors[1] == (
        "spec.leaderWorkerTemplate.workerTemplate.spec.containers[0]: "
        "Additional properties are not allowed ('imagePullPolicyy' was unexpected)"
    )


def test_leaderworkerset_volume_claim_templates_are_checked():
    obj = leaderworkerset()
    claim = {"metadata": {"name": "cache"}, "spec": {"accessModes": ["ReadWriteOnce"], "storageClass": "x"}}
    obj["spec"]["leaderWorkerTemplate"]["volumeClaimTemplates"] = [claim]
    assert validate_manifest(obj) == [
        "spec.leaderWorkerTemplate.volumeClaimTemplates[0].spec: "
        "Additional properties are not allowed ('storageClass' was unexpected)"
    ]


@pytest.mark.parametrize("kind", sorted(CUSTOM))
def test_custom_resource_metadata_is_checked_as_object_meta(kind):
    obj = CUSTOM[kind]()
    obj["metadata"]["labels"]["replicas"] = 2
    obj["metadata"]["lables"] = {}
    errors = validate_manifest(obj)
    assert "metadata: Additional properties are not allowed ('lables' was unexpected)" in errors
    assert any(e.startswith("metadata.labels.replicas: 2 is not of type 'string'") for e in errors), errors


def test_a_custom_kind_under_an_apiversion_its_crd_does_not_serve_fails():
    obj = scaledobject()
    obj["apiVersion"] = "keda.sh/v1"
    assert validate_manifest(obj) == ["no schema for keda.sh/v1/ScaledObject"]


# --- anything else ---------------------------------------------------------------------------------


def test_an_unknown_kind_fails():
    obj = {"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "w"}, "spec": {}}
    assert validate_manifest(obj) == ["no schema for example.com/v1/Widget"]


@pytest.mark.parametrize(
    ("obj", "error"),
    [
        ("kind: Deployment", "not a Kubernetes object: expected a mapping, got str"),
        ({"kind": "Deployment", "metadata": {"name": "x"}}, "apiVersion and kind must be non-empty strings"),
        ({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {}}, "metadata.name: required (a non-empty string)"),
        ({"apiVersion": "v1", "kind": "ConfigMap"}, "metadata.name: required (a non-empty string)"),
    ],
)
def test_malformed_objects_fail(obj, error):
    assert validate_manifest(obj) == [error]


def test_a_kustomization_is_not_a_kubernetes_object():
    kustomization = {"apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization", "resources": []}
    assert validate_manifest(kustomization) == [
        "kustomize.config.k8s.io/v1beta1/Kustomization is a kustomize file, not a Kubernetes object"
    ]
    assert validate_all([kustomization]) == {}


def test_validate_all_reports_only_the_invalid_objects_by_kind_and_name():
    bad_deployment = deployment()
    bad_deployment["spec"]["replicas"] = "2"
    bad_monitor = servicemonitor()
    bad_monitor["spec"]["endpoint"] = []
    second = servicemonitor()
    second["spec"]["selector"]["matchLabel"] = {}
    objs = [*builtins(), None, leaderworkerset(), scaledobject(), bad_deployment, bad_monitor, second]
    assert validate_all(objs) == {
        "Deployment/twllm-gateway": ["spec.replicas: '2' is not of type 'integer', 'null'"],
        "ServiceMonitor/twllm-gateway": ["spec: Additional properties are not allowed ('endpoint' was unexpected)"],
        f"ServiceMonitor/twllm-gateway#{len(objs) - 1}": [
            "spec.selector: Additional properties are not allowed ('matchLabel' was unexpected)"
        ],
    }
    assert validate_all([*builtins(), leaderworkerset(), scaledobject(), servicemonitor()]) == {}


def test_validation_is_offline(monkeypatch):
    """No schema is fetched: loading every schema and validating every kind with sockets disabled."""

    def no_network(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args!r}")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    _crd_validators.cache_clear()
    _k8s_definitions.cache_clear()
    assert validate_all([*builtins(), leaderworkerset(), scaledobject(), servicemonitor()]) == {}
    broken = leaderworkerset()
    broken["spec"]["leaderWorkerTemplate"]["workerTemplate"]["spec"]["containers"][0]["x"] = 1
    assert len(validate_manifest(broken)) == 1


# --- the strict transform and the vendored CRDs ------------------------------------------------------


def test_strict_schema_closes_objects_unless_unknown_fields_are_preserved():
    schema = {
        "type": "object",
        "properties": {
            "closed": {"type": "object", "properties": {"a": {"type": "string"}}},
            "open": {"type": "object", "x-kubernetes-preserve-unknown-fields": True, "properties": {"a": {}}},
            "map": {"type": "object", "additionalProperties": {"type": "object", "properties": {"b": {}}}},
            "list": {"type": "array", "items": {"type": "object", "properties": {"c": {}}}},
            "port": {"x-kubernetes-int-or-string": True},
            "maybe": {"type": "string", "nullable": True},
            "embedded": {"type": "object", "x-kubernetes-embedded-resource": True, "properties": {"spec": {}}},
            "choice": {"anyOf": [{"properties": {"d": {}}}]},
        },
    }
    strict = strict_schema(schema)
    props = strict["properties"]
    assert strict["additionalProperties"] is False
    assert props["closed"]["additionalProperties"] is False
    assert "additionalProperties" not in props["open"]
    assert props["map"]["additionalProperties"]["additionalProperties"] is False
    assert props["list"]["items"]["additionalProperties"] is False
    assert props["port"]["anyOf"] == [{"type": "integer"}, {"type": "string"}]
    assert props["maybe"]["type"] == ["string", "null"]
    assert {"apiVersion", "kind", "metadata", "spec"} <= set(props["embedded"]["properties"])
    assert props["choice"] == {"anyOf": [{"properties": {"d": {}}}]}  # value checks stay as they are
    assert "additionalProperties" not in schema  # the input is not changed


def test_the_vendored_crds_serve_the_versions_we_validate():
    assert crd_kinds() == [
        ("keda.sh/v1alpha1", "ScaledObject"),
        ("leaderworkerset.x-k8s.io/v1", "LeaderWorkerSet"),
        ("monitoring.coreos.com/v1", "ServiceMonitor"),
    ]
    for name in CRD_FILES:
        (crd,) = [d for d in yaml.safe_load_all((SCHEMA_DIR / name).read_text(encoding="utf-8")) if d]
        (version,) = crd["spec"]["versions"]
        assert version["served"] is True and version["storage"] is True
        assert "openAPIV3Schema" in version["schema"]
        assert name.startswith(crd["spec"]["group"] + "_" + crd["spec"]["names"]["plural"])


@pytest.mark.parametrize(
    ("name", "length"),
    [("monitoring.coreos.com_servicemonitors.yaml", 73717), ("keda.sh_scaledobjects.yaml", 22668)],
)
def test_the_verbatim_crds_are_unchanged(name, length):
    """README.md records these two as byte-for-byte copies of that many characters."""
    assert len((SCHEMA_DIR / name).read_text(encoding="utf-8")) == length


def test_the_leaderworkerset_excerpt_marks_exactly_the_four_cut_subtrees():
    text = (SCHEMA_DIR / "leaderworkerset.x-k8s.io_leaderworkersets.yaml").read_text(encoding="utf-8")
    markers = [line.split(": ")[1] for line in text.splitlines() if line.lstrip().startswith("x-twllm-elided:")]
    assert markers == [
        "io.k8s.api.core.v1.PodSpec",
        "io.k8s.api.core.v1.PersistentVolumeClaimSpec",
        "io.k8s.api.core.v1.PersistentVolumeClaimStatus",
        "io.k8s.api.core.v1.PodSpec",
    ]
    assert (Path(__file__).parents[1] / "k8s_schemas" / "README.md").is_file()
    assert K8S_VERSION.startswith("1.30.")
