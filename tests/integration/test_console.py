"""The web console in a real browser against the real gateway: log in, manage, see usage and charts.

One real gateway (twllm's entry point: the shield, LiteLLM, our hooks) with mock_response models
and a real embedded PostgreSQL, driven by headless Chromium (Debian's, through Playwright): the
admin logs in with the master key, creates a tenant (a slug and a display name that looks like
markup) and a key, the key calls the API through the ``openai`` SDK, and the usage chart shows it;
the display name and the names a tenant controls render as text everywhere; a tenant's key sees
its own view and gets 403 from every admin API; the admin rotates and revokes a key, and the
gateway refuses the old secrets within its key cache's TTL. Screenshots go to the folder printed
(``$TWLLM_TEST_ARTIFACTS`` if set, else the test's tmp_path).
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml
from pgutil import Postgres, sql
from proxyutil import ProxyHandle, start_proxy

from twllm.accounting.auth import KEY_CACHE_TTL_S
from twllm.console.access import Access
from twllm.console.api import ROUTES
from twllm.plan.build import ENGINE_KEY_ENV, make_plan
from twllm.plan.placement import GpuInventory
from twllm.render.litellm_config import render
from twllm.spec.resolve import parse_spec
from twllm.status import ComponentState, ComponentStatus, DeploymentState, DeploymentStatus

pytestmark = pytest.mark.integration

CHROMIUM = Path("/usr/bin/chromium")
MASTER = "sk-console-test-master-0123456789"
SPEC = """
name: console
gateway:
  master_key: ${TWLLM_MASTER_KEY}
  num_retries: 0
models:
  - {name: chat-a, model: llama-3.2-1b-instruct, price: {input_per_1m: 5, output_per_1m: 10}}
"""
XSS = "<img src=x onerror=alert(1)>"
GUARD_NOTE = "raw-note-never-shown"

if not CHROMIUM.exists():
    if os.environ.get("TWLLM_TESTS_STRICT"):  # CI installs it (.ci/run): its absence is a failure there
        raise RuntimeError(f"{CHROMIUM} is absent (apt-get install chromium)")
    pytest.skip(f"{CHROMIUM} is absent (apt-get install chromium)", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is in the dev extra")


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = Path(os.environ.get("TWLLM_TEST_ARTIFACTS") or tmp_path_factory.mktemp("console-artifacts"))
    folder = folder / "console" if os.environ.get("TWLLM_TEST_ARTIFACTS") else folder
    folder.mkdir(parents=True, exist_ok=True)
    print(f"\nconsole screenshots: {folder}", flush=True)
    return folder


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory, postgres: Postgres) -> Iterator[ProxyHandle]:
    out = tmp_path_factory.mktemp("console-gateway")
    loaded = parse_spec(SPEC, "console.yaml", {"TWLLM_MASTER_KEY": MASTER})
    plan = make_plan(loaded, GpuInventory(8, 80, "test"), out / "state")
    render(plan, loaded.spec, out)
    assert json.loads((out / "gateway.json").read_text())["state_dir"] == str(out / "state")
    path = out / "litellm_config.yaml"
    config = yaml.safe_load(path.read_text())
    for deployment in config["model_list"]:
        deployment["litellm_params"]["mock_response"] = "你好"
    config["general_settings"]["background_health_checks"] = False
    path.write_text(yaml.safe_dump(config, sort_keys=False, allow_unicode=True))
    state = DeploymentState(
        name="console",
        status=DeploymentStatus.READY,
        components=[
            ComponentState(name="postgres", kind="database", status=ComponentStatus.READY),
            ComponentState(name="chat-a-0", kind="engine", status=ComponentStatus.RESTARTING, restarts=2),
        ],
    )
    (out / "state").mkdir(exist_ok=True)
    (out / "state" / "state.json").write_text(state.to_json())
    env = {
        "TWLLM_MASTER_KEY": MASTER,
        ENGINE_KEY_ENV: "sk-engine-test",
        "TWLLM_GATEWAY_SETTINGS": str(out / "gateway.json"),
        "TWLLM_DATABASE_URL": postgres.url,
    }
    with start_proxy(path, env=env, workers=1, timeout=300) as handle:
        yield handle


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    with sync_api.sync_playwright() as pw:
        args = ["--no-sandbox"] if os.geteuid() == 0 else []
        b = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=args)
        yield b
        b.close()


def _page(browser: object, gateway: ProxyHandle, dialogs: list[str], errors: list[str], *, confirm: bool = False):  # type: ignore[no-untyped-def]
    """A fresh page; every dialog is recorded as 'type: message' and dismissed, except that a
    confirm() is accepted when ``confirm`` (an alert() would mean injected script ran)."""
    context = browser.new_context(locale="zh-TW")  # type: ignore[attr-defined]
    page = context.new_page()

    def on_dialog(dialog) -> None:  # type: ignore[no-untyped-def]
        dialogs.append(f"{dialog.type}: {dialog.message}")
        if confirm and dialog.type == "confirm":
            dialog.accept()
        else:
            dialog.dismiss()

    page.on("dialog", on_dialog)
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    return page


def _login(page, base_url: str, key: str, role: str) -> object:  # type: ignore[no-untyped-def]
    response = page.goto(base_url + "/console")
    page.fill("#login-key", key)
    page.click("#login-form button[type=submit]")
    page.wait_for_selector(f"body[data-ready={role}]", timeout=20_000)
    return response


def _wait_ledger(url: str, tenant: str, count: int) -> None:
    deadline = time.monotonic() + 20
    query = "SELECT count(*) FROM spend_ledger l JOIN tenants t ON t.id = l.tenant_id WHERE t.name = %s"
    while sql(url, query, (tenant,))[0][0] < count:
        assert time.monotonic() < deadline, "the ledger row never came"
        time.sleep(0.2)


def _refused_within(base_url: str, secret: str, seconds: float) -> str:
    """Call the gateway with ``secret`` until it answers 401 (within ``seconds``); the error code."""
    deadline = time.monotonic() + seconds
    body = {"model": "chat-a", "messages": [{"role": "user", "content": "hi"}]}
    with httpx.Client(base_url=base_url, timeout=30, trust_env=False) as http:
        while True:
            reply = http.post("/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {secret}"})
            if reply.status_code == 401:
                return str(reply.json()["error"]["code"])
            assert reply.status_code == 200, reply.text
            assert time.monotonic() < deadline, f"still accepted after {seconds} s"
            time.sleep(0.25)


def _key_row(page, key_id: int):  # type: ignore[no-untyped-def]
    """The keys table's row of this key (its first cell is the id)."""
    return page.locator("#key-rows tr").filter(has=page.locator("td:first-child", has_text=re.compile(f"^{key_id}$")))


def test_admin_and_tenant_in_the_browser(
    browser: object, gateway: ProxyHandle, postgres: Postgres, artifacts: Path
) -> None:
    import openai

    dialogs: list[str] = []
    errors: list[str] = []
    page = _page(browser, gateway, dialogs, errors)
    response = _login(page, gateway.base_url, MASTER, "admin")
    headers = response.headers
    assert "script-src 'self'" in headers["content-security-policy"] and "set-cookie" not in headers
    assert page.locator("html").get_attribute("lang") == "zh-Hant-TW"
    assert page.locator("#health-rows").inner_text().count("restarting") == 1  # state.json's components

    # A slug for commands and URLs, and a display name for people that looks like markup: text.
    tenant = f"acme-{os.getpid()}"
    page.fill("#tenant-name", tenant)
    page.fill("#tenant-display-name", XSS)
    page.click("#tenant-form button[type=submit]")
    page.wait_for_selector(f"#tenant-rows td:text-is('{tenant}')")
    cells = page.locator("#tenant-rows tr").filter(has=page.locator(f"td:text-is('{tenant}')")).locator("td")
    assert cells.nth(0).text_content() == tenant and cells.nth(1).text_content() == XSS
    assert page.locator(f"#key-tenant option[value='{tenant}']").text_content() == f"{XSS} ({tenant})"
    assert page.locator("#tenant-display-name").input_value() == ""

    # A name no tenant may have: refused, and the refusal (which quotes it) is shown as text.
    page.fill("#tenant-name", XSS)
    page.click("#tenant-form button[type=submit]")
    message = page.locator("#message")
    sync_api.expect(message).to_contain_text("invalid tenant name")  # (CSP: no eval, so no wait_for_function)
    assert XSS in (message.text_content() or "") and message.get_attribute("class") == "error"
    assert page.locator("img").count() == 0

    page.select_option("#key-tenant", tenant)
    page.fill("#key-name", XSS)  # a name the admin (or a tenant's request) chose: text, never markup
    page.fill("#key-models", "chat-a")
    page.fill("#key-rpm", "100")
    page.fill("#key-budget", "50")
    page.fill("#key-expires", "30d")
    page.click("#key-form button[type=submit]")
    page.wait_for_selector("#secret-box:not([hidden])")
    secret = page.locator("#secret").inner_text().strip()
    assert secret.startswith("sk-tw-")
    page.wait_for_selector("#key-rows td:text-is('" + XSS + "')")
    key_cells = page.locator("#key-rows tr").filter(has=page.locator(f"td:text-is('{secret[:12]}')")).locator("td")
    assert key_cells.nth(2).text_content() == XSS and key_cells.nth(3).text_content() == XSS  # tenant, key name
    page.screenshot(path=str(artifacts / "admin-key-created.png"), full_page=True)

    client = openai.OpenAI(api_key=secret, base_url=gateway.base_url + "/v1", max_retries=0)
    for _ in range(3):
        reply = client.chat.completions.create(model="chat-a", messages=[{"role": "user", "content": "hi"}])
        assert reply.choices[0].message.content == "你好"
    _wait_ledger(postgres.url, tenant, 3)
    guard = {"input": {"verdict": "block", "categories": ["S1"], "rules": ["tw_id:checksum"], "notes": [GUARD_NOTE]}}
    sql(
        postgres.url,
        "INSERT INTO spend_ledger (ts, request_id, tenant_id, key_id, model, status_code, guard) "
        "SELECT now(), 'guard-test', t.id, NULL, 'chat-a', 400, %s::jsonb FROM tenants t WHERE t.name = %s",
        (json.dumps(guard), tenant),
    )

    page.reload()
    page.wait_for_selector("body[data-ready=admin]")
    labels = page.evaluate("Chart.getChart('chart-tenant').data.labels")
    requests = page.evaluate("Chart.getChart('chart-tenant').data.datasets[0].data")
    assert XSS in labels and requests[labels.index(XSS)] == 4  # 3 calls + the guard's refusal
    assert page.evaluate("Chart.getChart('chart-day').data.datasets.length") >= 2  # requests, cost
    guard_text = page.locator("#guard-rows").inner_text()
    assert "S1" in guard_text and "block" in guard_text and GUARD_NOTE not in guard_text
    assert page.locator(f"#guard-rows td:text-is('{XSS}')").count() == 1
    page.click("#lang")
    page.wait_for_selector("body[data-lang=en]")
    assert page.locator("#usage h2").inner_text() == "Usage and spend"
    page.screenshot(path=str(artifacts / "admin-usage.png"), full_page=True)
    assert page.locator("img").count() == 0 and dialogs == []

    # The tenant's own view.
    tenant_page = _page(browser, gateway, dialogs, errors)
    _login(tenant_page, gateway.base_url, secret, "tenant")
    assert tenant_page.locator("#admin").count() == 0  # not hidden: not there at all
    assert tenant_page.locator("#tenant-title").text_content() == f"租戶: {XSS} ({tenant})"
    rows = tenant_page.locator("#my-key-rows").inner_text()
    assert XSS in rows and "100" in rows
    assert sum(tenant_page.evaluate("Chart.getChart('chart-my-model').data.datasets[0].data")) == 4
    tenant_page.screenshot(path=str(artifacts / "tenant-view.png"), full_page=True)
    assert dialogs == [] and tenant_page.locator("img").count() == 0
    assert not [e for e in errors if "Content Security Policy" in e], errors

    # Every admin API refuses the tenant's key (403), and the master key is still the admin.
    with httpx.Client(base_url=gateway.base_url, timeout=30, trust_env=False) as http:
        for route in ROUTES:
            path = re.sub(r"\(\?P<name>[^)]*\)", tenant, route.pattern.pattern)
            path = re.sub(r"\(\?P<action>[^)]*\)", "disable", path)
            path = re.sub(r"\(\?P<id>[^)]*\)", "1", path)
            reply = http.request(route.method, "/console/api/" + path, headers={"Authorization": f"Bearer {secret}"})
            if route.access is Access.ADMIN:
                assert reply.status_code == 403, (route, reply.text)
                assert reply.json()["error"]["code"] == "admin_only"
            else:
                assert reply.status_code in (200, 403), (route, reply.text)
        assert "set-cookie" not in reply.headers
        # Disabled by the admin: the tenant's key is refused by the gateway and the console.
        admin = {"Authorization": f"Bearer {MASTER}"}
        assert http.post(f"/console/api/tenants/{tenant}/disable", headers=admin).json()["disabled"] is True
        time.sleep(5.5)  # the gateway's key cache (KEY_CACHE_TTL_S)
        with pytest.raises(openai.PermissionDeniedError):
            client.chat.completions.create(model="chat-a", messages=[{"role": "user", "content": "hi"}])
        assert http.get("/console/api/me", headers={"Authorization": f"Bearer {secret}"}).status_code == 403


def test_admin_rotates_and_revokes_a_key_in_the_browser(
    browser: object, gateway: ProxyHandle, postgres: Postgres, artifacts: Path
) -> None:
    import openai

    tenant = f"rot-{os.getpid()}"
    admin = {"Authorization": f"Bearer {MASTER}"}
    with httpx.Client(base_url=gateway.base_url, timeout=30, trust_env=False) as http:
        made = http.post("/console/api/tenants", json={"name": tenant, "display_name": "輪替 測試"}, headers=admin)
        assert made.status_code == 200 and made.json()["display_name"] == "輪替 測試", made.text
        created = http.post("/console/api/keys", json={"tenant": tenant, "name": "to-rotate"}, headers=admin).json()
    old_id, old_secret = created["key"]["id"], created["secret"]

    def chat(secret: str) -> str | None:
        client = openai.OpenAI(api_key=secret, base_url=gateway.base_url + "/v1", max_retries=0)
        reply = client.chat.completions.create(model="chat-a", messages=[{"role": "user", "content": "hi"}])
        return reply.choices[0].message.content

    assert chat(old_secret) == "你好"  # now in the gateway's key cache

    dialogs: list[str] = []
    errors: list[str] = []
    page = _page(browser, gateway, dialogs, errors, confirm=True)
    _login(page, gateway.base_url, MASTER, "admin")
    old_row = _key_row(page, old_id)
    assert old_row.locator("td").nth(2).text_content() == "輪替 測試"

    # Rotate: the new secret is shown once; the old key is revoked and its row has no buttons left.
    old_row.get_by_role("button", name="輪替").click()
    page.wait_for_selector("#secret-box:not([hidden])")
    new_secret = (page.locator("#secret").text_content() or "").strip()
    assert new_secret.startswith("sk-tw-") and new_secret != old_secret
    sync_api.expect(old_row.locator(".status-revoked")).to_have_text("已撤銷")
    assert old_row.get_by_role("button").count() == 0
    new_row = page.locator("#key-rows tr").filter(has=page.locator(f"td:text-is('{new_secret[:12]}')"))
    assert new_row.locator(".status-active").text_content() == "啟用中"
    new_id = int(new_row.locator("td").nth(0).text_content() or "0")
    page.screenshot(path=str(artifacts / "admin-key-rotated.png"), full_page=True)
    page.click("#secret-close")
    assert page.locator("#secret-box").is_hidden() and page.locator("#secret").text_content() == ""
    page.reload()
    page.wait_for_selector("body[data-ready=admin]")
    assert new_secret not in page.content() and old_secret not in page.content()
    assert dialogs == []  # rotating asks nothing

    assert chat(new_secret) == "你好"
    began = time.monotonic()
    assert _refused_within(gateway.base_url, old_secret, KEY_CACHE_TTL_S + 10) == "revoked_api_key"
    print(f"\nrotated key refused after {time.monotonic() - began:.1f} s (key cache TTL {KEY_CACHE_TTL_S} s)")

    # Revoke: asked first (a confirm, accepted), then the row reads revoked and the gateway refuses it.
    new_row = _key_row(page, new_id)
    new_row.get_by_role("button", name="撤銷").click()
    sync_api.expect(new_row.locator(".status-revoked")).to_have_text("已撤銷")
    assert new_row.get_by_role("button").count() == 0
    assert dialogs == ["confirm: 確定撤銷此金鑰？"]
    page.screenshot(path=str(artifacts / "admin-key-revoked.png"), full_page=True)
    began = time.monotonic()
    assert _refused_within(gateway.base_url, new_secret, KEY_CACHE_TTL_S + 10) == "revoked_api_key"
    print(f"revoked key refused after {time.monotonic() - began:.1f} s")
    revoked = {
        r[0]: r[1]
        for r in sql(
            postgres.url, "SELECT id, revoked_at IS NOT NULL FROM api_keys WHERE id = ANY(%s)", ([old_id, new_id],)
        )
    }
    assert revoked == {old_id: True, new_id: True}
    assert not [d for d in dialogs if not d.startswith("confirm:")] and page.locator("img").count() == 0
    assert not [e for e in errors if "Content Security Policy" in e], errors
