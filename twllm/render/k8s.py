"""Kubernetes manifests from the same Plan the local deploy runs: `twllm render k8s`.

Pure, like the rest of ``twllm.render``: a LoadedSpec and its Plan in, manifests (plain dicts) out;
``write_k8s`` writes them as one YAML file per object kind plus a ``kustomization.yaml``, so that
``kubectl apply -k DIR`` applies the lot.

One source of truth. Every vLLM container runs the plan's own argv (``EngineProcess.argv``) with
two differences, both because a pod is not the host: ``--host`` is ``0.0.0.0`` (the Service
reaches the pod on its own address), and ``CUDA_VISIBLE_DEVICES`` is left out (the device plugin
gives the pod its GPUs). A model spanning nodes adds ``--distributed-executor-backend ray``.
The gateway runs ``python -m twllm.gateway.serve`` on the LiteLLM config and gateway.json that
``render.litellm_config`` writes for the local deploy, from a plan whose routes point at the
engines' Services instead of 127.0.0.1 (one route per model: the Service spreads requests over
the model's pods).

What is made, per model:

- vLLM, one node per replica: a Deployment (``replicas`` from the spec) on vLLM's official image,
  ``nvidia.com/gpu`` = tensor × pipeline parallel per pod, ``/dev/shm`` in memory, the shared
  model cache volume, ``HF_TOKEN`` and the engine key from the Secret, startup and liveness
  probes on ``/health`` and a readiness probe that asks ``/v1/models`` for the model with the
  engine key; a Service.
- vLLM over several nodes (``nodes > 1``): a LeaderWorkerSet (group size = nodes); the leader
  starts Ray's head, waits for every worker and runs ``vllm serve`` with Ray as executor; workers
  join the head. Tensor parallel stays within a node, pipeline stages go across nodes.
- Ollama (all its models): a StatefulSet with a volume, which pulls its models at start; a Service.

And once: the gateway (ConfigMap, Deployment, Service, HorizontalPodAutoscaler on CPU,
PodDisruptionBudget), the migration Job (``twllm db migrate``), the model-cache claim, a
NetworkPolicy per engine (only the gateway's pods, the model's own pods and the monitoring
namespace reach it), and optionally a KEDA ScaledObject per vLLM model on
``vllm:num_requests_waiting`` and a ServiceMonitor.

Secrets are never rendered: containers read them from one Secret the operator creates (``secret``
keys are the variable names the local deploy uses); ``secret_keys`` lists them.
"""

from __future__ import annotations

import hashlib
import re
import shlex
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from twllm import __version__
from twllm.errors import PlanError
from twllm.files import write_atomic
from twllm.plan.build import make_plan
from twllm.plan.model import EngineProcess, Plan, Route
from twllm.plan.placement import GpuInventory
from twllm.render.litellm_config import GATEWAY_SETTINGS, LITELLM_CONFIG, PLAN_FILE, gateway_settings, litellm_config
from twllm.settings import (
    ENGINE_KEY_ENV,
    GATEWAY_SETTINGS_ENV,
    PROMETHEUS_MULTIPROC_DIR_ENV,
    SPOOL_DIR_ENV,
)
from twllm.spec.resolve import LoadedSpec, ResolvedModel

CONFIG_MOUNT = "/etc/twllm"
STATE_ROOT = "/var/lib/twllm"
"""The gateway pod's state: the spool and the metrics folder (emptyDir volumes)."""
CACHE_MOUNT = "/root/.cache/huggingface"
"""Where vLLM's image keeps Hugging Face downloads (the model-cache claim is mounted here)."""
OLLAMA_MOUNT = "/root/.ollama"
RAY_PORT = 6379
HF_TOKEN_ENV = "HF_TOKEN"
PART_OF = "twllm"

FILES = (
    "namespace.yaml",
    "gateway.yaml",
    "migrate-job.yaml",
    "engines.yaml",
    "model-cache.yaml",
    "network-policies.yaml",
    "keda.yaml",
    "service-monitor.yaml",
)


@dataclass(frozen=True)
class K8sOptions:
    """Command-line overrides of the spec's ``kubernetes`` section."""

    namespace: str | None = None
    image: str | None = None


@dataclass(frozen=True)
class K8sRender:
    """The manifests by file, the Secret's keys, and notes for the operator."""

    files: dict[str, list[dict[str, Any]]]
    secret_name: str
    secret_keys: tuple[str, ...]
    """Keys the operator's Secret must hold (HF_TOKEN optional)."""
    notes: tuple[str, ...]
    gateway_config: dict[str, str]
    """The gateway's ConfigMap data (LiteLLM config, gateway.json, plan.json)."""

    def objects(self) -> list[dict[str, Any]]:
        return [obj for name in FILES for obj in self.files.get(name, [])]


def dns_name(text: str, limit: int = 63) -> str:
    """A DNS-1123 label from a spec name: lower case, [a-z0-9-], at most ``limit`` characters
    (a hash suffix keeps long names apart)."""
    slug = re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-") or "x"
    if len(slug) <= limit and slug == text:
        return slug
    digest = hashlib.sha256(text.encode()).hexdigest()[:6]
    return f"{slug[: limit - 7].rstrip('-')}-{digest}" if len(slug) > limit else slug


def engine_args(proc: EngineProcess) -> list[str]:
    """A vLLM engine's argv as its container runs it: the plan's, listening on every address."""
    argv = list(proc.argv)
    at = argv.index("--host")
    argv[at + 1] = "0.0.0.0"
    return argv


def cluster_plan(loaded: LoadedSpec) -> Plan:
    """The plan ``make_plan`` makes for a cluster: as many GPUs as the models ask for (each pod gets
    its own from the device plugin), the memory check against ``hardware.gpu_memory_gib`` when
    given, and the gateway pod's state folder."""
    needed = sum(m.gpus_per_replica * m.spec.replicas for m in loaded.models)
    inventory = GpuInventory(needed, loaded.spec.hardware.gpu_memory_gib, "kubernetes")
    return make_plan(loaded, inventory, Path(STATE_ROOT))


def render_k8s(loaded: LoadedSpec, plan: Plan | None = None, options: K8sOptions = K8sOptions()) -> K8sRender:
    """Every manifest of the deployment (see the module docstring); ``plan``: ``cluster_plan``."""
    return _Renderer(loaded, plan or cluster_plan(loaded), options).run()


class _Dumper(yaml.SafeDumper):
    """Plain YAML: a value used twice is written twice, never as an anchor and alias."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def write_k8s(result: K8sRender, out: Path) -> list[Path]:
    """Write one YAML file per kind of object, the kustomization and a secret template (names of
    keys only); each file 0600 and replaced atomically. Returns the paths."""
    out.mkdir(parents=True, exist_ok=True)
    written = []
    resources = []
    for name in FILES:
        objs = result.files.get(name)
        if not objs:
            (out / name).unlink(missing_ok=True)  # an earlier render's file the spec no longer asks for
            continue
        text = yaml.dump_all(objs, Dumper=_Dumper, sort_keys=False, allow_unicode=True, width=120)
        write_atomic(out / name, text)
        written.append(out / name)
        resources.append(name)
    kustomization = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "namespace": result.files["namespace.yaml"][0]["metadata"]["name"],
        "resources": resources,
    }
    write_atomic(out / "kustomization.yaml", yaml.safe_dump(kustomization, sort_keys=False))
    # The Secret's keys, never values: `kubectl create secret generic NAME --from-env-file=secrets.env`.
    write_atomic(out / "secrets.env.example", "".join(f"{key}=\n" for key in result.secret_keys))
    return [*written, out / "kustomization.yaml", out / "secrets.env.example"]


class _Renderer:
    def __init__(self, loaded: LoadedSpec, plan: Plan, options: K8sOptions) -> None:
        self.loaded = loaded
        self.spec = loaded.spec
        self.k8s = loaded.spec.kubernetes
        self.plan = plan
        self.namespace = options.namespace or self.k8s.namespace
        self.image = options.image or self.k8s.gateway_image or f"twllm-gateway:{__version__}"
        self.instance = dns_name(plan.name)
        self.secret = self.k8s.secret_name or dns_name(f"{plan.name}-secrets")
        self.notes: list[str] = []
        self.models = {m.name: m for m in loaded.models}
        self.services: dict[str, tuple[str, int]] = {}
        """engine id (replica 0 / ollama) -> (Service name, port)."""
        if not dns_name(self.namespace) == self.namespace:
            raise PlanError(f"--namespace {self.namespace!r} is not a DNS label (lower case letters, digits, '-')")

    # --- names and labels --------------------------------------------------------------------

    def labels(self, component: str, model: str | None = None) -> dict[str, str]:
        out = {
            "app.kubernetes.io/name": "twllm",
            "app.kubernetes.io/instance": self.instance,
            "app.kubernetes.io/component": component,
            "app.kubernetes.io/part-of": PART_OF,
            "app.kubernetes.io/version": __version__,
        }
        if model is not None:
            out["twllm.io/model"] = dns_name(model)
        return out

    def selector(self, component: str, model: str | None = None) -> dict[str, str]:
        out = {"app.kubernetes.io/instance": self.instance, "app.kubernetes.io/component": component}
        if model is not None:
            out["twllm.io/model"] = dns_name(model)
        return out

    def meta(self, name: str, component: str, model: str | None = None) -> dict[str, Any]:
        return {"name": name, "namespace": self.namespace, "labels": self.labels(component, model)}

    def secret_ref(self, key: str, optional: bool = False) -> dict[str, Any]:
        ref: dict[str, Any] = {"name": self.secret, "key": key}
        if optional:
            ref["optional"] = True
        return {"secretKeyRef": ref}

    # --- the whole -----------------------------------------------------------------------------

    def run(self) -> K8sRender:
        self._check()
        engines = [e for e in self.plan.engines if e.engine == "vllm" and e.id.endswith("-0")]
        ollama = next((e for e in self.plan.engines if e.engine == "ollama"), None)
        for proc in engines:
            self.services[proc.id] = (dns_name(f"vllm-{proc.models[0]}"), proc.port)
        if ollama is not None:
            self.services[ollama.id] = ("ollama", ollama.port)

        engine_objs: list[dict[str, Any]] = []
        for proc in engines:
            model = self.models[proc.models[0]]
            engine_objs += self._vllm(proc, model)
        if ollama is not None:
            engine_objs += self._ollama(ollama)
        k8s_plan = self._cluster_plan()
        config = self._gateway_config(k8s_plan)
        files: dict[str, list[dict[str, Any]]] = {
            "namespace.yaml": [
                {
                    "apiVersion": "v1",
                    "kind": "Namespace",
                    "metadata": {"name": self.namespace, "labels": {"app.kubernetes.io/part-of": PART_OF}},
                }
            ],
            "gateway.yaml": self._gateway(k8s_plan, config),
            "migrate-job.yaml": [self._migrate_job(config)],
            "engines.yaml": engine_objs,
            "model-cache.yaml": [self._model_cache()] if engines else [],
            "network-policies.yaml": self._network_policies(engines, ollama),
            "keda.yaml": self._keda(engines) if self.k8s.keda.enabled else [],
            "service-monitor.yaml": self._service_monitors(engines) if self.k8s.service_monitor else [],
        }
        keys = [self.plan.gateway.master_key_env, ENGINE_KEY_ENV]
        if self.plan.database.url_env:
            keys.append(self.plan.database.url_env)
        keys.append(HF_TOKEN_ENV)
        return K8sRender(
            files=files,
            secret_name=self.secret,
            secret_keys=tuple(dict.fromkeys(keys)),
            notes=tuple(self.notes),
            gateway_config=config,
        )

    def _check(self) -> None:
        problems = []
        if self.plan.database.embedded:
            problems.append(
                "database.url: Kubernetes needs a PostgreSQL outside the gateway pods; give its URL "
                "(CloudNativePG is the recommended in-cluster choice)"
            )
        for model in self.loaded.models:
            if model.engine == "vllm" and model.weights_kind != "hf":
                problems.append(
                    f"models[{model.name}].source: a local path cannot be rendered to Kubernetes; "
                    "use source.hf (engine pods download into the model cache)"
                )
            if model.engine == "ollama" and model.weights_kind == "gguf":
                problems.append(
                    f"models[{model.name}].source.gguf: a local GGUF file cannot be rendered; use source.ollama"
                )
        if problems:
            raise PlanError("cannot render for Kubernetes:\n  " + "\n  ".join(problems))
        if self.plan.gateway.tls_cert:
            self.notes.append("gateway.tls is for one host: in a cluster terminate TLS at the Ingress or Gateway")
        guard = self.spec.guard
        stages = set(guard.input) | set(guard.output)
        if "llama_guard" in stages or "prompt_guard" in stages:
            self.notes.append(
                "guard models that run inside the gateway need their weights in the gateway image "
                "(build it with --build-arg EXTRAS=guard and bake or mount the model files)"
            )

    # --- the plan as the cluster sees it -------------------------------------------------------

    def _cluster_plan(self) -> Plan:
        """The plan with one route per model, to its Service, and the gateway on every address."""
        routes: list[Route] = []
        seen: set[str] = set()
        for route in self.plan.routes:
            if route.model_name in seen:
                continue
            seen.add(route.model_name)
            engine_id = route.engine_id if route.engine_id == "ollama" else f"vllm-{route.model_name}-0"
            service, port = self.services[engine_id]
            base = f"http://{service}.{self.namespace}.svc:{port}" + ("" if engine_id == "ollama" else "/v1")
            model = self.models[route.model_name].spec
            routes.append(
                route.model_copy(
                    update={
                        "api_base": base,
                        "deployment_id": dns_name(f"{route.model_name}"),
                        "engine_id": engine_id,
                        "rpm": model.rpm,
                        "tpm": model.tpm,
                    }
                )
            )
        gw = self.plan.gateway
        return self.plan.model_copy(
            update={
                "routes": tuple(routes),
                "state_dir": STATE_ROOT,
                "spec_file": None,
                "gateway": gw.model_copy(
                    update={
                        "host": "0.0.0.0",
                        "url": f"http://gateway.{self.namespace}.svc:{gw.port}/v1",
                        "tls_cert": None,
                        "tls_key": None,
                    }
                ),
            }
        )

    def _gateway_config(self, plan: Plan) -> dict[str, str]:
        return {
            LITELLM_CONFIG: yaml.safe_dump(litellm_config(plan, self.spec), sort_keys=False, allow_unicode=True),
            GATEWAY_SETTINGS: gateway_settings(plan, self.spec).to_json(),
            PLAN_FILE: plan.to_json(),
        }

    # --- engines -------------------------------------------------------------------------------

    def _engine_env(self, proc: EngineProcess) -> list[dict[str, Any]]:
        env: list[dict[str, Any]] = [
            {"name": name, "value": value} for name, value in proc.env.items() if name != "CUDA_VISIBLE_DEVICES"
        ]
        env += [{"name": child, "valueFrom": self.secret_ref(parent)} for child, parent in proc.secret_env.items()]
        env.append({"name": HF_TOKEN_ENV, "valueFrom": self.secret_ref(HF_TOKEN_ENV, optional=True)})
        return env

    def _gpu_pod(self, gpus: int) -> dict[str, Any]:
        nodes = self.k8s.gpu_nodes
        pod: dict[str, Any] = {}
        if gpus and nodes.node_selector:
            pod["nodeSelector"] = dict(nodes.node_selector)
        if gpus and nodes.tolerations:
            pod["tolerations"] = [t.model_dump(exclude_none=True) for t in nodes.tolerations]
        return pod

    def _resources(self, gpus: int) -> dict[str, Any]:
        if not gpus:
            return {"requests": {"cpu": "2", "memory": "8Gi"}}
        resource = self.k8s.gpu_nodes.resource
        return {"limits": {resource: str(gpus)}, "requests": {resource: str(gpus)}}

    def _vllm_volumes(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        volumes = [
            {"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": "16Gi"}},
            {"name": "model-cache", "persistentVolumeClaim": {"claimName": self._cache_name()}},
        ]
        mounts = [{"name": "shm", "mountPath": "/dev/shm"}, {"name": "model-cache", "mountPath": CACHE_MOUNT}]
        return volumes, mounts

    def _probes(self, proc: EngineProcess, model: str) -> dict[str, Any]:
        port = proc.port
        # /v1/models wants the engine key, which a probe's httpHeaders would have to spell out:
        # the readiness check runs in the container, reading the key from its environment.
        ready = (
            "import json, os, sys, urllib.request\n"
            f"r = urllib.request.Request('http://127.0.0.1:{port}/v1/models', "
            "headers={'Authorization': 'Bearer ' + os.environ['VLLM_API_KEY']})\n"
            "ids = [m['id'] for m in json.load(urllib.request.urlopen(r, timeout=5))['data']]\n"
            f"sys.exit(0 if {model!r} in ids else 1)\n"
        )
        health = {"httpGet": {"path": "/health", "port": port}}
        return {
            "startupProbe": {**health, "periodSeconds": 10, "failureThreshold": int(proc.start_timeout_s // 10) + 1},
            "livenessProbe": {**health, "periodSeconds": 15, "timeoutSeconds": 5, "failureThreshold": 4},
            "readinessProbe": {
                "exec": {"command": ["python3", "-c", ready]},
                "periodSeconds": 10,
                "timeoutSeconds": 8,
                "failureThreshold": 3,
            },
        }

    def _vllm(self, proc: EngineProcess, model: ResolvedModel) -> list[dict[str, Any]]:
        name, port = self.services[proc.id]
        nodes = model.spec.nodes
        gpus = model.gpus_per_replica // nodes
        volumes, mounts = self._vllm_volumes()
        args = engine_args(proc)
        container: dict[str, Any] = {
            "name": "vllm",
            "image": self.k8s.vllm_image,
            "command": [args[0]],
            "args": args[1:],
            "env": self._engine_env(proc),
            "ports": [{"name": "http", "containerPort": port}],
            "resources": self._resources(gpus),
            "volumeMounts": mounts,
            **self._probes(proc, model.name),
        }
        selector = self.selector("engine", model.name)
        if nodes > 1:  # over several nodes the leader pod (index 0) is the one the Service reaches
            selector["role"] = "leader"
        service: dict[str, Any] = {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": self.meta(name, "engine", model.name),
            "spec": {"selector": selector, "ports": [{"name": "http", "port": port, "targetPort": port}]},
        }
        if nodes == 1:
            deployment = {
                "apiVersion": "apps/v1",
                "kind": "Deployment",
                "metadata": self.meta(name, "engine", model.name),
                "spec": {
                    "replicas": model.spec.replicas,
                    "selector": {"matchLabels": self.selector("engine", model.name)},
                    # Two copies of a large model rarely fit the GPUs at once: replace, don't surge.
                    "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 0, "maxUnavailable": 1}},
                    "template": {
                        "metadata": {"labels": self.labels("engine", model.name)},
                        "spec": {**self._gpu_pod(gpus), "containers": [container], "volumes": volumes},
                    },
                },
            }
            return [deployment, service]
        return [self._leader_worker_set(name, model, container, volumes, gpus, nodes), service]

    def _leader_worker_set(
        self,
        name: str,
        model: ResolvedModel,
        container: dict[str, Any],
        volumes: list[dict[str, Any]],
        gpus: int,
        nodes: int,
    ) -> dict[str, Any]:
        argv = [container["command"][0], *container["args"], "--distributed-executor-backend", "ray"]
        leader_script = (
            f"ray start --head --port={RAY_PORT} && "
            # vLLM places its workers when it starts: wait until every node has joined.
            f'until [ "$(ray status 2>/dev/null | grep -c " node_")" -ge "$LWS_GROUP_SIZE" ]; '
            "do echo waiting for the Ray workers; sleep 5; done && "
            f"exec {shlex.join(argv)}"
        )
        worker_script = f"exec ray start --address=$LWS_LEADER_ADDRESS:{RAY_PORT} --block"
        leader = {
            **{k: v for k, v in container.items() if k not in ("command", "args")},
            "command": ["sh", "-c", leader_script],
        }
        leader["ports"] = [*container["ports"], {"name": "ray", "containerPort": RAY_PORT}]
        worker = {
            "name": "ray-worker",
            "image": self.k8s.vllm_image,
            "command": ["sh", "-c", worker_script],
            "env": container["env"],
            "resources": container["resources"],
            "volumeMounts": container["volumeMounts"],
        }
        pod = self._gpu_pod(gpus)

        def template(role: str, c: dict[str, Any]) -> dict[str, Any]:
            return {
                "metadata": {"labels": {**self.labels("engine", model.name), "role": role}},
                "spec": {**pod, "containers": [c], "volumes": volumes},
            }

        return {
            "apiVersion": "leaderworkerset.x-k8s.io/v1",
            "kind": "LeaderWorkerSet",
            "metadata": self.meta(name, "engine", model.name),
            "spec": {
                "replicas": model.spec.replicas,
                "leaderWorkerTemplate": {
                    "size": nodes,
                    "restartPolicy": "RecreateGroupOnPodRestart",
                    "leaderTemplate": template("leader", leader),
                    "workerTemplate": template("worker", worker),
                },
            },
        }

    def _ollama(self, proc: EngineProcess) -> list[dict[str, Any]]:
        name, port = self.services[proc.id]
        env = dict(proc.env)
        env["OLLAMA_HOST"] = f"0.0.0.0:{port}"
        env["OLLAMA_MODELS"] = f"{OLLAMA_MOUNT}/models"
        pulls = " && ".join(f"ollama pull {shlex.quote(p['pull'])}" for p in proc.provision if "pull" in p)
        script = (
            "ollama serve & server=$!; "
            "until ollama list >/dev/null 2>&1; do sleep 1; done; "
            + (f"{pulls} || exit 1; " if pulls else "")
            + "wait $server"
        )
        container = {
            "name": "ollama",
            "image": self.k8s.ollama_image,
            "command": ["sh", "-c", script],
            "env": [{"name": k, "value": v} for k, v in sorted(env.items())],
            "ports": [{"name": "http", "containerPort": port}],
            "resources": {"requests": {"cpu": "2", "memory": "8Gi"}},
            "volumeMounts": [{"name": "ollama", "mountPath": OLLAMA_MOUNT}],
            "startupProbe": {
                "httpGet": {"path": "/api/tags", "port": port},
                "periodSeconds": 10,
                "failureThreshold": int(proc.start_timeout_s // 10) + 1,
            },
            "readinessProbe": {"httpGet": {"path": "/api/tags", "port": port}, "periodSeconds": 10},
            "livenessProbe": {"httpGet": {"path": "/api/version", "port": port}, "periodSeconds": 20},
        }
        statefulset = {
            "apiVersion": "apps/v1",
            "kind": "StatefulSet",
            "metadata": self.meta(name, "engine", "ollama"),
            "spec": {
                "serviceName": name,
                "replicas": 1,
                "selector": {"matchLabels": self.selector("engine", "ollama")},
                "template": {
                    "metadata": {"labels": self.labels("engine", "ollama")},
                    "spec": {"containers": [container]},
                },
                "volumeClaimTemplates": [
                    {
                        "metadata": {"name": "ollama"},
                        "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "50Gi"}}},
                    }
                ],
            },
        }
        service = {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": self.meta(name, "engine", "ollama"),
            "spec": {
                "selector": self.selector("engine", "ollama"),
                "ports": [{"name": "http", "port": port, "targetPort": port}],
            },
        }
        return [statefulset, service]

    def _cache_name(self) -> str:
        return dns_name(f"{self.instance}-model-cache")

    def _model_cache(self) -> dict[str, Any]:
        cache = self.k8s.model_cache
        spec: dict[str, Any] = {"accessModes": [cache.access_mode], "resources": {"requests": {"storage": cache.size}}}
        if cache.storage_class is not None:
            spec["storageClassName"] = cache.storage_class
        return {
            "apiVersion": "v1",
            "kind": "PersistentVolumeClaim",
            "metadata": self.meta(self._cache_name(), "model-cache"),
            "spec": spec,
        }

    # --- the gateway ---------------------------------------------------------------------------

    def _gateway_env(self) -> list[dict[str, Any]]:
        gw = self.plan.gateway
        env: list[dict[str, Any]] = [
            {"name": GATEWAY_SETTINGS_ENV, "value": f"{CONFIG_MOUNT}/{GATEWAY_SETTINGS}"},
            {"name": "LITELLM_LOCAL_MODEL_COST_MAP", "value": "True"},
            {"name": "LITELLM_OFFLINE_MODE", "value": "true"},
            {"name": "LITELLM_DONT_SHOW_FEEDBACK_BOX", "value": "true"},
            {"name": "PYTHONUNBUFFERED", "value": "1"},
            {"name": SPOOL_DIR_ENV, "value": f"{STATE_ROOT}/spool"},
            {"name": gw.master_key_env, "valueFrom": self.secret_ref(gw.master_key_env)},
            {"name": ENGINE_KEY_ENV, "valueFrom": self.secret_ref(ENGINE_KEY_ENV)},
        ]
        if self.spec.monitoring.metrics.enabled:
            env.append({"name": PROMETHEUS_MULTIPROC_DIR_ENV, "value": f"{STATE_ROOT}/metrics"})
        if self.plan.database.url_env:
            env.append({"name": self.plan.database.url_env, "valueFrom": self.secret_ref(self.plan.database.url_env)})
        return env

    def _gateway(self, plan: Plan, config: dict[str, str]) -> list[dict[str, Any]]:
        gw, scaling = plan.gateway, self.k8s.gateway
        metrics_port = self.spec.monitoring.metrics.port if self.spec.monitoring.metrics.enabled else None
        ports = [{"name": "http", "containerPort": gw.port}]
        if metrics_port is not None:
            ports.append({"name": "metrics", "containerPort": metrics_port})
        container = {
            "name": "gateway",
            "image": self.image,
            "command": ["python", "-m", "twllm.gateway.serve"],
            "args": [
                "--config",
                f"{CONFIG_MOUNT}/{LITELLM_CONFIG}",
                "--host",
                "0.0.0.0",
                "--port",
                str(gw.port),
                "--workers",
                # One per pod unless the spec says: pods scale out, on the cluster's cores.
                str(self.spec.gateway.workers or 1),
            ],
            "env": self._gateway_env(),
            "ports": ports,
            "resources": {
                "requests": {"cpu": scaling.cpu, "memory": scaling.memory},
                "limits": {"memory": scaling.memory},
            },
            "volumeMounts": [
                {"name": "config", "mountPath": CONFIG_MOUNT, "readOnly": True},
                {"name": "state", "mountPath": STATE_ROOT},
                {"name": "tmp", "mountPath": "/tmp"},
            ],
            "securityContext": {
                "allowPrivilegeEscalation": False,
                "readOnlyRootFilesystem": True,
                "capabilities": {"drop": ["ALL"]},
            },
            "startupProbe": {
                "httpGet": {"path": "/health/liveliness", "port": gw.port},
                "periodSeconds": 5,
                "failureThreshold": int(gw.start_timeout_s // 5) + 1,
            },
            "livenessProbe": {"httpGet": {"path": "/health/liveliness", "port": gw.port}, "periodSeconds": 15},
            "readinessProbe": {"httpGet": {"path": "/health/readiness", "port": gw.port}, "periodSeconds": 10},
        }
        config_map = {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": self.meta("gateway-config", "gateway"),
            "data": config,
        }
        digest = hashlib.sha256("".join(config[k] for k in sorted(config)).encode()).hexdigest()[:16]
        deployment = {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": self.meta("gateway", "gateway"),
            "spec": {
                "replicas": scaling.replicas,
                "selector": {"matchLabels": self.selector("gateway")},
                "template": {
                    # A changed config rolls the pods (a ConfigMap edit alone would not).
                    "metadata": {"labels": self.labels("gateway"), "annotations": {"twllm.io/config-sha256": digest}},
                    "spec": {
                        "securityContext": {
                            "runAsNonRoot": True,
                            "runAsUser": 10001,
                            "runAsGroup": 10001,
                            "fsGroup": 10001,
                            "seccompProfile": {"type": "RuntimeDefault"},
                        },
                        "terminationGracePeriodSeconds": 60,
                        "containers": [container],
                        "volumes": [
                            {"name": "config", "configMap": {"name": "gateway-config"}},
                            {"name": "state", "emptyDir": {}},
                            {"name": "tmp", "emptyDir": {}},
                        ],
                    },
                },
            },
        }
        service_ports = [{"name": "http", "port": gw.port, "targetPort": gw.port}]
        if metrics_port is not None:
            service_ports.append({"name": "metrics", "port": metrics_port, "targetPort": metrics_port})
        service = {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": self.meta("gateway", "gateway"),
            "spec": {"selector": self.selector("gateway"), "ports": service_ports},
        }
        hpa = {
            "apiVersion": "autoscaling/v2",
            "kind": "HorizontalPodAutoscaler",
            "metadata": self.meta("gateway", "gateway"),
            "spec": {
                "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "gateway"},
                "minReplicas": scaling.replicas,
                "maxReplicas": scaling.max_replicas,
                "metrics": [
                    {
                        "type": "Resource",
                        "resource": {
                            "name": "cpu",
                            "target": {"type": "Utilization", "averageUtilization": scaling.cpu_target_percent},
                        },
                    }
                ],
            },
        }
        pdb = {
            "apiVersion": "policy/v1",
            "kind": "PodDisruptionBudget",
            "metadata": self.meta("gateway", "gateway"),
            "spec": {"maxUnavailable": 1, "selector": {"matchLabels": self.selector("gateway")}},
        }
        return [config_map, deployment, service, hpa, pdb]

    def _migrate_job(self, config: dict[str, str]) -> dict[str, Any]:
        env = [e for e in self._gateway_env() if e["name"] == self.plan.database.url_env]
        return {
            "apiVersion": "batch/v1",
            "kind": "Job",
            "metadata": self.meta("db-migrate", "migrate"),
            "spec": {
                "backoffLimit": 6,
                "ttlSecondsAfterFinished": 86400,
                "template": {
                    "metadata": {"labels": self.labels("migrate")},
                    "spec": {
                        "restartPolicy": "OnFailure",
                        "securityContext": {"runAsNonRoot": True, "runAsUser": 10001, "runAsGroup": 10001},
                        "containers": [
                            {
                                "name": "migrate",
                                "image": self.image,
                                # plan.json in the gateway's ConfigMap names the database URL's variable.
                                "command": ["twllm", "db", "migrate", "--state-dir", CONFIG_MOUNT],
                                "env": env,
                                "volumeMounts": [{"name": "config", "mountPath": CONFIG_MOUNT, "readOnly": True}],
                            }
                        ],
                        "volumes": [{"name": "config", "configMap": {"name": "gateway-config"}}],
                    },
                },
            },
        }

    # --- around the engines --------------------------------------------------------------------

    def _network_policies(self, engines: Iterable[EngineProcess], ollama: EngineProcess | None) -> list[dict[str, Any]]:
        out = []
        targets = [(p.models[0], self.services[p.id]) for p in engines]
        if ollama is not None:
            targets.append(("ollama", self.services[ollama.id]))
        for model, (name, _port) in targets:
            peers: list[dict[str, Any]] = [
                {"podSelector": {"matchLabels": self.selector("gateway")}},
                # The other pods of a model spanning nodes (Ray) reach each other.
                {"podSelector": {"matchLabels": self.selector("engine", model)}},
            ]
            if self.k8s.service_monitor or self.k8s.keda.enabled:
                peers.append(
                    {
                        "namespaceSelector": {
                            "matchLabels": {"kubernetes.io/metadata.name": self.k8s.monitoring_namespace}
                        }
                    }
                )
            out.append(
                {
                    "apiVersion": "networking.k8s.io/v1",
                    "kind": "NetworkPolicy",
                    "metadata": self.meta(f"{name}-from-gateway", "engine", model),
                    "spec": {
                        "podSelector": {"matchLabels": self.selector("engine", model)},
                        "policyTypes": ["Ingress"],
                        "ingress": [{"from": peers}],
                    },
                }
            )
        return out

    def _keda(self, engines: Iterable[EngineProcess]) -> list[dict[str, Any]]:
        keda = self.k8s.keda
        out = []
        for proc in engines:
            model = self.models[proc.models[0]]
            name, _ = self.services[proc.id]
            kind = "Deployment" if model.spec.nodes == 1 else "LeaderWorkerSet"
            api = "apps/v1" if kind == "Deployment" else "leaderworkerset.x-k8s.io/v1"
            query = f'sum(vllm:num_requests_waiting{{namespace="{self.namespace}",model_name="{model.name}"}})'
            out.append(
                {
                    "apiVersion": "keda.sh/v1alpha1",
                    "kind": "ScaledObject",
                    "metadata": self.meta(name, "engine", model.name),
                    "spec": {
                        "scaleTargetRef": {"apiVersion": api, "kind": kind, "name": name},
                        "minReplicaCount": model.spec.replicas,
                        "maxReplicaCount": max(keda.max_replicas, model.spec.replicas),
                        # A GPU pod takes minutes to load its model: scale down slowly.
                        "cooldownPeriod": 600,
                        "triggers": [
                            {
                                "type": "prometheus",
                                "metadata": {
                                    "serverAddress": keda.prometheus_url,
                                    "query": query,
                                    "threshold": str(keda.queue_per_replica),
                                },
                            }
                        ],
                    },
                }
            )
        return out

    def _service_monitors(self, engines: list[EngineProcess]) -> list[dict[str, Any]]:
        interval = f"{self.spec.monitoring.scrape_interval_s}s"
        gw = self.plan.gateway
        if self.spec.monitoring.metrics.port is not None:
            gateway_endpoint: dict[str, Any] = {"port": "metrics", "path": "/metrics", "interval": interval}
        else:
            gateway_endpoint = {
                "port": "http",
                "path": "/metrics",
                "interval": interval,
                "authorization": {"type": "Bearer", "credentials": {"name": self.secret, "key": gw.master_key_env}},
            }
        out = []
        if self.spec.monitoring.metrics.enabled:
            out.append(
                {
                    "apiVersion": "monitoring.coreos.com/v1",
                    "kind": "ServiceMonitor",
                    "metadata": self.meta("gateway", "gateway"),
                    "spec": {"selector": {"matchLabels": self.selector("gateway")}, "endpoints": [gateway_endpoint]},
                }
            )
        if engines:
            out.append(
                {
                    "apiVersion": "monitoring.coreos.com/v1",
                    "kind": "ServiceMonitor",
                    "metadata": self.meta("vllm-engines", "engine"),
                    "spec": {
                        "selector": {"matchLabels": self.selector("engine")},
                        "endpoints": [{"port": "http", "path": "/metrics", "interval": interval}],
                    },
                }
            )
        return out
