"""`twllm render k8s`: the manifests come from the same Plan as the local deploy (engine argv),
hold no secret, pass Kubernetes' and the CRDs' schemas, and refuse what a cluster cannot run."""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml

from twllm.cli.app import main
from twllm.errors import PlanError
from twllm.plan.build import make_plan
from twllm.plan.placement import GpuInventory
from twllm.render.k8s import K8sOptions, cluster_plan, dns_name, engine_args, render_k8s, write_k8s
from twllm.spec.resolve import parse_spec

MASTER = "sk-k8s-master-never-rendered"
DB_URL = "postgresql://twllm:db-password-never-rendered@db.example:5432/twllm"
ENV = {"TWLLM_MASTER_KEY": MASTER, "TWLLM_DATABASE_URL": DB_URL}
SPEC = """\
name: prod-tw
gateway: {master_key: "${TWLLM_MASTER_KEY}", workers: 2}
database: {url: "${TWLLM_DATABASE_URL}"}
kubernetes:
  gateway: {replicas: 3, max_replicas: 12}
  keda: {enabled: true}
  service_monitor: true
models:
  - {name: taide-8b, model: llama-3.1-8b-instruct, tensor_parallel: 2, replicas: 2, rpm: 600}
  - {name: big, model: llama-3.1-70b-instruct, tensor_parallel: 4, pipeline_parallel: 2, nodes: 2}
  - {name: bge-m3, model: bge-m3}
  - {name: phi-cpu, model: llama-3.2-1b-instruct, engine: ollama}
"""


def loaded_spec(text: str = SPEC) -> Any:
    return parse_spec(text, "prod.yaml", ENV)


def by_kind(objs: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {o["metadata"]["name"]: o for o in objs if o["kind"] == kind}


@pytest.fixture(scope="module")
def rendered() -> Any:
    return render_k8s(loaded_spec())


def test_every_kind_the_issue_lists_is_rendered(rendered: Any) -> None:
    objs = rendered.objects()
    kinds = sorted({o["kind"] for o in objs})
    assert kinds == sorted(
        [
            "ConfigMap",
            "Deployment",
            "HorizontalPodAutoscaler",
            "Job",
            "LeaderWorkerSet",
            "Namespace",
            "NetworkPolicy",
            "PersistentVolumeClaim",
            "PodDisruptionBudget",
            "ScaledObject",
            "Service",
            "ServiceMonitor",
            "StatefulSet",
        ]
    )
    assert set(by_kind(objs, "Deployment")) == {"gateway", "vllm-taide-8b", "vllm-bge-m3"}
    assert set(by_kind(objs, "LeaderWorkerSet")) == {"vllm-big"}
    assert set(by_kind(objs, "StatefulSet")) == {"ollama"}
    assert set(by_kind(objs, "Service")) == {"gateway", "vllm-taide-8b", "vllm-big", "vllm-bge-m3", "ollama"}
    assert set(by_kind(objs, "ScaledObject")) == {"vllm-taide-8b", "vllm-big", "vllm-bge-m3"}
    assert all(o["metadata"].get("namespace") == "twllm" for o in objs if o["kind"] != "Namespace")


def test_engine_containers_run_the_local_plans_argv(rendered: Any) -> None:
    """The same Plan: a local plan of this spec (on an 8-GPU host for the 2 × TP2 model, then on
    one big enough for the TP4 × PP2 one) gives the argv every engine container runs, but for
    --host (a pod listens on its own address)."""
    objs = rendered.objects()
    local = make_plan(loaded_spec(), GpuInventory(16, 80, "test"), Path("/srv/state"))
    argv = {e.id: list(e.argv) for e in local.engines}

    def pod_argv(container: dict[str, Any]) -> list[str]:
        return [*container["command"], *container["args"]]

    for model in ("taide-8b", "bge-m3"):
        container = by_kind(objs, "Deployment")[f"vllm-{model}"]["spec"]["template"]["spec"]["containers"][0]
        expected = argv[f"vllm-{model}-0"]
        assert expected[expected.index("--host") + 1] == "127.0.0.1"
        expected[expected.index("--host") + 1] = "0.0.0.0"
        assert pod_argv(container) == expected
        assert "CUDA_VISIBLE_DEVICES" not in {e["name"] for e in container["env"]}
    taide = by_kind(objs, "Deployment")["vllm-taide-8b"]
    assert taide["spec"]["replicas"] == 2
    assert taide["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"] == {"nvidia.com/gpu": "2"}
    assert taide["spec"]["template"]["spec"]["volumes"][0] == {
        "name": "shm",
        "emptyDir": {"medium": "Memory", "sizeLimit": "16Gi"},
    }

    lws = by_kind(objs, "LeaderWorkerSet")["vllm-big"]["spec"]["leaderWorkerTemplate"]
    assert lws["size"] == 2
    leader = lws["leaderTemplate"]["spec"]["containers"][0]
    worker = lws["workerTemplate"]["spec"]["containers"][0]
    big = argv["vllm-big-0"]
    big[big.index("--host") + 1] = "0.0.0.0"
    assert "--tensor-parallel-size 4" in shlex.join(big) and "--pipeline-parallel-size 2" in shlex.join(big)
    script = leader["command"][2]
    assert script.startswith("ray start --head")
    assert script.endswith("exec " + shlex.join([*big, "--distributed-executor-backend", "ray"]))
    assert worker["command"][2].startswith("exec ray start --address=$LWS_LEADER_ADDRESS")
    # TP within a node, PP across nodes: 8 GPUs per replica, 4 on each of the 2 nodes.
    assert leader["resources"]["limits"] == {"nvidia.com/gpu": "4"} == worker["resources"]["limits"]


def test_gateway_scales_and_routes_to_the_engine_services(rendered: Any) -> None:
    objs = rendered.objects()
    gateway = by_kind(objs, "Deployment")["gateway"]
    assert gateway["spec"]["replicas"] == 3
    pod = gateway["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    container = pod["containers"][0]
    assert container["command"] == ["python", "-m", "twllm.gateway.serve"]
    assert container["args"][-2:] == ["--workers", "2"]
    hpa = by_kind(objs, "HorizontalPodAutoscaler")["gateway"]["spec"]
    assert (hpa["minReplicas"], hpa["maxReplicas"]) == (3, 12)
    assert by_kind(objs, "PodDisruptionBudget")["gateway"]["spec"]["maxUnavailable"] == 1
    config = yaml.safe_load(rendered.gateway_config["litellm_config.yaml"])
    bases = {d["model_name"]: d["litellm_params"]["api_base"] for d in config["model_list"]}
    assert bases == {
        "taide-8b": "http://vllm-taide-8b.twllm.svc:8100/v1",
        "big": "http://vllm-big.twllm.svc:8102/v1",
        "bge-m3": "http://vllm-bge-m3.twllm.svc:8103/v1",
        "phi-cpu": "http://ollama.twllm.svc:11434",
    }
    # One route per model (its Service spreads the pods), so the model's RPM is not split.
    rpm = {d["model_name"]: d["litellm_params"].get("rpm") for d in config["model_list"]}
    assert rpm["taide-8b"] == 600
    job = by_kind(objs, "Job")["db-migrate"]["spec"]["template"]["spec"]["containers"][0]
    assert job["command"] == ["twllm", "db", "migrate", "--state-dir", "/etc/twllm"]
    assert json.loads(rendered.gateway_config["plan.json"])["database"]["url_env"] == "TWLLM_DATABASE_URL"


def test_engines_accept_only_the_gateway_their_peers_and_monitoring(rendered: Any) -> None:
    policies = by_kind(rendered.objects(), "NetworkPolicy")
    assert len(policies) == 4
    taide = policies["vllm-taide-8b-from-gateway"]["spec"]
    assert taide["podSelector"]["matchLabels"]["twllm.io/model"] == "taide-8b"
    peers = taide["ingress"][0]["from"]
    assert peers[0]["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == "gateway"
    assert peers[2] == {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}


def test_no_secret_is_rendered_anywhere(rendered: Any, tmp_path: Path) -> None:
    paths = write_k8s(rendered, tmp_path / "k8s")
    text = "".join(p.read_text() for p in paths)
    for secret in (MASTER, DB_URL, "db-password-never-rendered"):
        assert secret not in text
    for config_map in by_kind(rendered.objects(), "ConfigMap").values():
        assert all(s not in json.dumps(config_map) for s in (MASTER, "db-password"))
    keys = {ref["valueFrom"]["secretKeyRef"]["key"] for ref in _env_refs(rendered.objects())}
    assert keys == {"TWLLM_MASTER_KEY", "TWLLM_ENGINE_API_KEY", "TWLLM_DATABASE_URL", "HF_TOKEN"}
    assert set(rendered.secret_keys) == keys
    assert (tmp_path / "k8s" / "secrets.env.example").read_text().splitlines() == [
        f"{k}=" for k in rendered.secret_keys
    ]
    assert {p.stat().st_mode & 0o777 for p in paths} == {0o600}
    kustomization = yaml.safe_load((tmp_path / "k8s" / "kustomization.yaml").read_text())
    assert kustomization["namespace"] == "twllm"
    assert all((tmp_path / "k8s" / f).is_file() for f in kustomization["resources"])


def _env_refs(objs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if "valueFrom" in node and "secretKeyRef" in node["valueFrom"]:
                found.append(node)
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(objs)
    return found


def test_namespace_and_image_flags_and_optional_objects() -> None:
    plain = SPEC.replace("  keda: {enabled: true}\n  service_monitor: true\n", "")
    result = render_k8s(loaded_spec(plain), options=K8sOptions(namespace="tw-prod", image="registry.tw/twllm:1.2"))
    objs = result.objects()
    assert {o["kind"] for o in objs}.isdisjoint({"ScaledObject", "ServiceMonitor"})
    assert {o["metadata"].get("namespace") for o in objs if o["kind"] != "Namespace"} == {"tw-prod"}
    gateway = by_kind(objs, "Deployment")["gateway"]["spec"]["template"]["spec"]["containers"][0]
    assert gateway["image"] == "registry.tw/twllm:1.2"
    # Without monitoring, the engines accept the gateway and their own pods only.
    policy = by_kind(objs, "NetworkPolicy")["vllm-taide-8b-from-gateway"]["spec"]
    assert len(policy["ingress"][0]["from"]) == 2
    with pytest.raises(PlanError, match="DNS label"):
        render_k8s(loaded_spec(plain), options=K8sOptions(namespace="Bad_NS"))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda s: s.replace('database: {url: "${TWLLM_DATABASE_URL}"}\n', ""), "database.url"),
        (
            lambda s: s.replace("model: bge-m3}", "model: bge-m3, source: {path: /data/bge}}"),
            r"models\[bge-m3\].source",
        ),
    ],
)
def test_what_a_cluster_cannot_run_is_refused_by_name(change: Any, message: str) -> None:
    with pytest.raises(PlanError, match=message):
        render_k8s(loaded_spec(change(SPEC)))


def test_a_model_spanning_nodes_needs_pipeline_stages_per_node() -> None:
    from twllm.errors import SpecError

    bad = SPEC.replace("pipeline_parallel: 2, nodes: 2", "pipeline_parallel: 3, nodes: 2")
    with pytest.raises(SpecError, match="nodes"):
        loaded_spec(bad)


def test_names_become_dns_labels() -> None:
    assert dns_name("taide-8b") == "taide-8b"
    assert dns_name("Llama_3.1:8B") == "llama-3-1-8b"
    long = dns_name("x" * 80)
    assert len(long) <= 63 and long != dns_name("x" * 81)


def test_engine_args_only_change_the_host() -> None:
    plan = cluster_plan(loaded_spec())
    proc = next(e for e in plan.engines if e.id == "vllm-taide-8b-0")
    args = engine_args(proc)
    assert [a for a, b in zip(args, proc.argv, strict=True) if a != b] == ["0.0.0.0"]


def test_the_command_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    spec = tmp_path / "prod.yaml"
    spec.write_text(SPEC)
    for name, value in ENV.items():
        monkeypatch.setenv(name, value)
    out = tmp_path / "k8s"
    assert main(["render", "k8s", "-c", str(spec), "-o", str(out), "--namespace", "tw", "--image", "reg/gw:1"]) == 0
    shown = capsys.readouterr().out
    assert "kubectl apply -k" in shown and "prod-tw-secrets" in shown
    assert yaml.safe_load((out / "kustomization.yaml").read_text())["namespace"] == "tw"
    assert main(["render", "-c", str(spec), "-o", str(tmp_path / "x"), "--namespace", "tw"]) == 2


def test_every_manifest_passes_kubernetes_1_30_and_the_crd_schemas_strictly(rendered: Any, tmp_path: Path) -> None:
    """kubernetes-validate --strict for 1.30 (built-in kinds) and the vendored CRD schemas
    (LeaderWorkerSet, ScaledObject, ServiceMonitor; tests/k8s_schemas/README.md), as written to disk."""
    from k8s_validate import validate_all

    write_k8s(rendered, tmp_path / "k8s")
    objs = [o for f in sorted((tmp_path / "k8s").glob("*.yaml")) for o in yaml.safe_load_all(f.read_text())]
    assert len(objs) == 26  # 25 objects and the kustomization (skipped by the validator)
    assert validate_all(objs) == {}
    plain = SPEC.replace("  keda: {enabled: true}\n  service_monitor: true\n", "")
    variant = plain.replace("gateway: {master_key:", "monitoring: {metrics: {port: 9464}}\ngateway: {master_key:")
    assert validate_all(render_k8s(loaded_spec(variant), options=K8sOptions(namespace="tw")).objects()) == {}


def test_the_validator_would_catch_a_broken_manifest(rendered: Any) -> None:
    from k8s_validate import validate_all

    objs = json.loads(json.dumps(rendered.objects()))
    gateway = next(o for o in objs if o["kind"] == "Deployment" and o["metadata"]["name"] == "gateway")
    gateway["spec"]["template"]["spec"]["containers"][0]["imagePullPolicyy"] = "Always"
    lws = next(o for o in objs if o["kind"] == "LeaderWorkerSet")
    lws["spec"]["leaderWorkerTemplate"]["size"] = "two"
    assert set(validate_all(objs)) == {"Deployment/gateway", "LeaderWorkerSet/vllm-big"}


def test_the_kubernetes_validate_command_accepts_the_built_in_kinds(rendered: Any, tmp_path: Path) -> None:
    """The command line operators run (`kubernetes-validate --strict -k 1.30.0`) on every file that
    holds only built-in kinds (engines.yaml holds a LeaderWorkerSet: the test above covers it)."""
    import subprocess
    import sys

    write_k8s(rendered, tmp_path / "k8s")
    files = [str(tmp_path / "k8s" / f) for f in ("namespace.yaml", "gateway.yaml", "migrate-job.yaml")]
    files += [str(tmp_path / "k8s" / f) for f in ("model-cache.yaml", "network-policies.yaml")]
    tool = Path(sys.executable).with_name("kubernetes-validate")
    done = subprocess.run([str(tool), "--strict", "-k", "1.30.0", *files], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("passed for resource") == 12
