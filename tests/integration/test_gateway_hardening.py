"""Nothing of the machinery behind the gateway is reachable: routes, body size, TLS, CORS, logs.

The real gateway (twllm's entry point, started with the supervisor's own command and the
rendered config, custom auth against a real PostgreSQL) serves HTTPS with a certificate made on
the spot. Its engine is ``echo_upstream`` — a stand-in named as such — since no test here needs
a model's answer. Every route LiteLLM's app declares is probed: it either works or answers 404.
"""

from __future__ import annotations

import datetime
import json
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml
from echo_upstream import EchoUpstream
from pgutil import Postgres, free_port
from stackutil import _stop

from twllm.gateway.asgi import allowed
from twllm.plan.build import ENGINE_KEY_ENV, make_plan
from twllm.plan.placement import GpuInventory
from twllm.render.litellm_config import render
from twllm.runtime.engines.envs import child_env
from twllm.runtime.gateway import gateway_launch
from twllm.spec.resolve import parse_spec

pytestmark = pytest.mark.integration

MASTER = "sk-hardening-master-0123456789"
ORIGIN = "https://app.example.tw"
CONSOLE = "/console"
"""twllm's web console (twllm.console): served by the shield itself, before LiteLLM."""
SPEC = """
name: hardening
gateway:
  port: {port}
  master_key: ${{TWLLM_MASTER_KEY}}
  num_retries: 0
  tls: {{cert: cert.pem, key: key.pem}}
  cors_origins: ["{origin}"]
models:
  - {{name: chat, model: llama-3.2-1b-instruct}}
"""
FORBIDDEN = re.compile(
    r"(?i:litellm|hosted_vllm|traceback|https?://|127\.0\.0\.1|prisma)|\b[A-Z]\w*(?:Error|Exception)\b"
)


def make_certificate(folder: Path) -> Path:
    """A self-signed certificate for 127.0.0.1 (cert.pem, key.pem in ``folder``)."""
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "twllm test gateway")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    (folder / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (folder / "key.pem").write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    (folder / "key.pem").chmod(0o600)
    return folder / "cert.pem"


class Gateway:
    def __init__(self, url: str, cert: Path, log: Path, proc: subprocess.Popen[bytes]) -> None:
        self.url, self.cert, self.log, self.proc = url, cert, log, proc

    def client(self) -> httpx.Client:
        return httpx.Client(
            base_url=self.url,
            verify=str(self.cert),
            timeout=30,
            trust_env=False,
            headers={"Authorization": f"Bearer {MASTER}"},
        )


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory, postgres: Postgres) -> Iterator[Gateway]:
    folder = tmp_path_factory.mktemp("hardening")
    cert = make_certificate(folder)
    spec_path = folder / "spec.yaml"
    spec_path.write_text(SPEC.format(port=free_port(), origin=ORIGIN), encoding="utf-8")
    loaded = parse_spec(spec_path.read_text(), str(spec_path), {"TWLLM_MASTER_KEY": MASTER})
    plan = make_plan(loaded, GpuInventory(8, 80, "test"), folder / "state")
    assert plan.gateway.url.startswith("https://") and plan.gateway.tls_cert == str(cert)
    rendered = folder / "rendered"
    with EchoUpstream() as upstream:
        render(plan, loaded.spec, rendered)
        config = yaml.safe_load((rendered / "litellm_config.yaml").read_text())
        for deployment in config["model_list"]:  # answered by the echo stand-in
            deployment["litellm_params"].update({"model": "openai/echo", "api_base": upstream.base_url})
        config["general_settings"]["background_health_checks"] = False
        (rendered / "litellm_config.yaml").write_text(yaml.safe_dump(config, sort_keys=False, allow_unicode=True))
        launch = gateway_launch(
            plan.gateway,
            rendered,
            {"TWLLM_MASTER_KEY": MASTER, ENGINE_KEY_ENV: "sk-engine-x"},
            database_url=postgres.url,
            spool_dir=folder / "spool",
        )
        assert "--ssl-certfile" in launch.argv
        log = folder / "gateway.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(
                launch.argv,
                env={**child_env(launch.env), "OMP_NUM_THREADS": "1"},
                cwd=launch.cwd,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        gw = Gateway(plan.gateway.url.removesuffix("/v1"), cert, log, proc)
        try:
            deadline = time.monotonic() + 120
            with gw.client() as client:
                while True:
                    assert proc.poll() is None, log.read_text()[-3000:]
                    assert time.monotonic() < deadline, log.read_text()[-3000:]
                    try:
                        if client.get("/health/liveliness").status_code == 200:
                            break
                    except httpx.HTTPError:
                        time.sleep(0.3)
            yield gw
        finally:
            _stop(proc)


def test_https_only_with_the_specs_certificate(gateway: Gateway) -> None:
    with gateway.client() as client:
        reply = client.post(
            "/v1/chat/completions", json={"model": "chat", "messages": [{"role": "user", "content": "你好"}]}
        )
        assert reply.status_code == 200, reply.text
        assert reply.json()["choices"][0]["message"]["content"] == "好的。"
    plain = gateway.url.replace("https://", "http://")
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"{plain}/health/liveliness", timeout=5, trust_env=False)


def test_a_20_mb_body_is_413_before_it_is_read(gateway: Gateway) -> None:
    body = json.dumps({"model": "chat", "messages": [{"role": "user", "content": "台" * (7 * 1024 * 1024)}]})
    assert len(body.encode()) > 20_000_000
    with gateway.client() as client:
        began = time.perf_counter()
        reply = client.post("/v1/chat/completions", content=body.encode(), headers={"Content-Type": "application/json"})
        took = time.perf_counter() - began
        assert reply.status_code == 413, reply.text[:300]
        assert reply.json()["error"]["code"] == "request_too_large"
        print(f"\n20 MB body: 413 in {took * 1000:.0f} ms", flush=True)

        def chunks() -> Iterator[bytes]:  # no Content-Length: refused as the limit is passed
            for _ in range(21):
                yield b"x" * 1_000_000

        reply = client.post("/v1/embeddings", content=chunks(), headers={"Content-Type": "application/json"})
        assert reply.status_code == 413


def _app_routes() -> list[tuple[str, str]]:
    """(method, path) of every route LiteLLM's proxy app declares, parameters filled in."""
    from litellm.proxy._lazy_features import register_all_features
    from litellm.proxy.proxy_server import app
    from starlette.routing import Mount, WebSocketRoute

    register_all_features(app)  # LiteLLM attaches most routers on a path's first request

    found: set[tuple[str, str]] = set()

    def add(route: object, path: str, methods: object) -> None:
        path = re.sub(r"\{[^}]+\}", "x", path) or "/"
        if isinstance(route, WebSocketRoute) or "WebSocket" in type(route).__name__:
            found.add(("WEBSOCKET", path))
        elif isinstance(route, Mount):
            found.add(("GET", path.rstrip("/") + "/"))
        else:
            for method in sorted(methods or {"GET"}):  # type: ignore[call-overload]
                if method != "HEAD":
                    found.add((method, path))

    def walk(route: object) -> None:
        if hasattr(route, "effective_candidates"):  # FastAPI's included router (0.136+), nested
            for item in route.effective_candidates():
                walk(item)
        elif hasattr(route, "original_route"):  # one route of an included router
            add(route.original_route, route.path, getattr(route, "methods", None))
        else:
            add(route, getattr(route, "path", ""), getattr(route, "methods", None))

    for route in app.routes:
        walk(route)
    return sorted(found)


def test_every_route_of_the_app_works_or_is_404(gateway: Gateway) -> None:
    routes = _app_routes()
    assert len(routes) > 300  # LiteLLM's app: the whole management API
    served, refused, other = [], [], []
    with gateway.client() as client:
        for method, path in routes:
            if method == "WEBSOCKET":
                continue
            if path == CONSOLE or path.startswith(CONSOLE + "/"):
                continue  # the deliberate exception: twllm's console (test_the_console_is_the_one_exception)
            body = {"model": "chat", "messages": [{"role": "user", "content": "hi"}], "input": "hi"}
            reply = client.request(method, path, json=body if method in ("POST", "PUT", "PATCH") else None)
            # 501 not_implemented: the stored-response routes of the Responses API, deliberately
            # (the gateway stores no responses; README, "The Responses API").
            deliberate = reply.status_code == 501 and reply.json()["error"]["code"] == "not_implemented"
            assert reply.status_code < 500 or deliberate, (method, path, reply.text[:300])
            if allowed(method, path):
                served.append((method, path, reply.status_code))
                assert reply.status_code != 404 or path.startswith(("/v1/models/", "/models/")), (method, path)
            elif reply.status_code == 404:
                refused.append((method, path))
                error = reply.json()["error"]
                assert set(error) == {"message", "type", "param", "code"}
                # the message may name the path the client asked for (as OpenAI's does), nothing else
                assert not FORBIDDEN.search(reply.text.replace(path, "PATH")), reply.text
            else:
                other.append((method, path, reply.status_code))
    print(f"\n{len(routes)} routes: {len(served)} served, {len(refused)} answered 404", flush=True)
    # Besides a 405 for a path served with another method, only the stored-response routes of the
    # Responses API answer otherwise: 501 not_implemented (the gateway stores no responses).
    stored = [(m, p) for m, p, status in other if status == 501 and "/responses/" in p]
    assert len(stored) >= 6, other
    other = [o for o in other if (o[0], o[1]) not in set(stored)]
    assert other == [] or all(status == 405 and allowed("GET", p) is not None for _, p, status in other), other
    assert {p for _, p, _ in served} >= {"/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/models"}
    with gateway.client() as client:
        ui = client.get("/ui/")
        assert ui.status_code == 404 and "twllm keys" in ui.json()["error"]["message"]
        for path in ("/key/generate", "/user/new", "/team/new", "/spend/logs"):
            assert "twllm usage" in client.post(path, json={}).json()["error"]["message"]


def test_the_console_is_the_one_exception(gateway: Gateway) -> None:
    """/console is served by twllm's own console (not LiteLLM, not the allowlist): its page, and
    an API that refuses every request without a key."""
    with gateway.client() as client:
        page = client.get(CONSOLE)
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert "script-src 'self'" in page.headers["content-security-policy"] and "set-cookie" not in page.headers
        for path in ("/console/api/tenants", "/console/api/keys", "/console/api/usage"):
            reply = client.get(path, headers={"Authorization": ""})  # the client sends the master key otherwise
            assert reply.status_code == 401 and reply.json()["error"]["code"] == "missing_api_key"
        assert client.get("/console/api/tenants", headers={"Authorization": f"Bearer {MASTER}"}).status_code == 200
        assert client.get("/console/../ui/").status_code == 404


def test_websocket_routes_are_closed(gateway: Gateway) -> None:
    import ssl

    from websockets.sync.client import connect

    context = ssl.create_default_context(cafile=str(gateway.cert))
    url = gateway.url.replace("https://", "wss://") + "/v1/realtime?model=chat"
    with pytest.raises(Exception) as caught:
        with connect(url, ssl=context, additional_headers={"Authorization": f"Bearer {MASTER}"}, open_timeout=10) as ws:
            ws.recv(timeout=5)
    assert "403" in str(caught.value) or "1008" in str(caught.value) or "rejected" in str(caught.value).lower()


def test_cors_only_for_the_specs_origins(gateway: Gateway) -> None:
    with gateway.client() as client:
        ok = client.options("/v1/chat/completions", headers={"Origin": ORIGIN, "Access-Control-Request-Method": "POST"})
        assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] == ORIGIN
        bad = client.options(
            "/v1/chat/completions", headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"}
        )
        assert bad.status_code >= 400 and "access-control-allow-origin" not in bad.headers
        plain = client.get("/v1/models", headers={"Origin": "https://evil.example"})
        assert plain.status_code == 200 and "access-control-allow-origin" not in plain.headers
        listed = client.get("/v1/models", headers={"Origin": ORIGIN})
        assert listed.headers["access-control-allow-origin"] == ORIGIN


def test_no_internal_headers_and_a_quiet_log(gateway: Gateway) -> None:
    with gateway.client() as client:
        reply = client.post(
            "/v1/chat/completions", json={"model": "chat", "messages": [{"role": "user", "content": "hi"}]}
        )
        assert reply.status_code == 200
        leaked = [k for k in reply.headers if k.startswith(("x-litellm", "llm_provider"))]
        assert leaked == [] and "server" not in reply.headers
        assert client.post("/v1/chat/completions", json={"model": "nope", "messages": []}).status_code == 404
        assert (
            client.post(
                "/v1/chat/completions",
                headers={"Authorization": "Bearer sk-wrong"},
                json={"model": "chat", "messages": []},
            ).status_code
            == 401
        )
    time.sleep(0.5)
    log = gateway.log.read_text(errors="replace")
    bad = [line for line in log.splitlines() if "ERROR" in line or "Traceback" in line]
    assert bad == [], "\n".join(bad[:20])
    assert MASTER not in log
