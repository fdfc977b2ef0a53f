"""Side by side: the same load straight to the engine, through bare LiteLLM, through twllm, and with guards.

  direct       the model's first vLLM engine, with the deployment's engine key;
  litellm      a bare LiteLLM proxy whose config holds only ``model_list`` (the routes of the
               model, as twllm renders them) and the master key — no router tuning, no hooks;
  twllm        the deployment's gateway, called with a tenant key (auth + spend ledger);
  twllm+guard  a second gateway rendered from the same spec with ``guard: {input: [pii],
               output: [pii]}``, sharing the engine and the database, with the same tenant key.

The deployment is the one ``twllm deploy`` makes (``twllm.runtime.control.deploy``): when the
spec's state directory already holds a running deployment it is used as it is, otherwise it is
deployed first and stopped at the end. The extra gateways are started with the deployment's own
gateway launcher (``twllm.runtime.gateway.gateway_launch``) on free ports.

Rounds interleave the targets, rotating their order (round 1: a b c d, round 2: b c d a, ...) so
that drift of the machine hits every target alike; each target's samples are pooled over rounds.
"""

from __future__ import annotations

import dataclasses
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import yaml

from twllm.bench import report
from twllm.bench.load import LoadSettings
from twllm.bench.runner import Load, run_locust
from twllm.errors import RuntimeFailure
from twllm.plan.model import Plan
from twllm.runtime.ports import free_port
from twllm.runtime.state import StateDir
from twllm.settings import ENGINE_KEY_ENV, PREFIX
from twllm.spec.resolve import LoadedSpec

TARGETS = ("direct", "litellm", "twllm", "twllm+guard")
GUARD_STAGES = ["pii"]
TARGET_P50_VS_LITELLM = 1.15
"""The gateway's p50 E2EL may be at most this many times bare LiteLLM's."""
TARGET_TOKS_VS_DIRECT = 0.95
"""The gateway's output tokens/s should be at least this share of the engine's own (at concurrency 16)."""
READY_TIMEOUT_S = 300.0

Say = Callable[[str], None]


@dataclass
class Target:
    name: str
    endpoint: str
    model: str
    """The name this endpoint serves the model under."""
    api_key: str = field(repr=False)
    note: str = ""


# --- processes ----------------------------------------------------------------------------------


class Proxy:
    """A LiteLLM proxy process in its own session, its output in a log file."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], cwd: Path, log: Path) -> None:
        self.name, self.log = name, log
        with log.open("wb") as out:
            self.proc = subprocess.Popen(
                argv,
                env=env,
                cwd=cwd,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def stop(self) -> None:
        from twllm.runtime.supervisor import stop_group

        if self.proc.poll() is None:
            stop_group(self.proc.pid, 15, self.proc)

    def tail(self, lines: int = 30) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])


def wait_for_chat(target: Target, timeout: float = READY_TIMEOUT_S, proxy: Proxy | None = None) -> int:
    """Wait until a one-token chat completion through ``target`` succeeds; the requests it took."""
    deadline = time.monotonic() + timeout
    body = {"model": target.model, "messages": [{"role": "user", "content": "ping"}], "max_tokens": 1}
    headers = {"Authorization": f"Bearer {target.api_key}"}
    attempts, last = 0, ""
    while time.monotonic() < deadline:
        if proxy is not None and proxy.proc.poll() is not None:
            raise RuntimeFailure(f"{target.name}: the proxy exited ({proxy.proc.returncode}); its log:\n{proxy.tail()}")
        attempts += 1
        try:
            reply = httpx.post(
                f"{target.endpoint}/chat/completions", json=body, headers=headers, timeout=60, trust_env=False
            )
            if reply.status_code == 200:
                return attempts
            last = f"HTTP {reply.status_code}"
        except httpx.HTTPError as exc:
            last = type(exc).__name__
        time.sleep(1.0)
    raise RuntimeFailure(f"{target.name} never answered a chat completion ({last})")


def proxy_env(extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(PREFIX) and k != "DATABASE_URL"}
    env.update(
        {
            "LITELLM_LOCAL_MODEL_COST_MAP": "True",
            "LITELLM_OFFLINE_MODE": "true",
            "LITELLM_DONT_SHOW_FEEDBACK_BOX": "true",
            "PYTHONUNBUFFERED": "1",
        }
    )
    env.update(extra)
    return env


def bare_litellm_config(plan: Plan, model: str) -> dict[str, Any]:
    """Only ``model_list`` (the model's routes, as twllm renders them) and the master key."""
    from twllm.render.litellm_config import litellm_config

    rendered = litellm_config(plan)
    routes = [d for d in rendered["model_list"] if d["model_name"] == model]
    return {"model_list": routes, "general_settings": {"master_key": f"os.environ/{plan.gateway.master_key_env}"}}


def start_bare_litellm(plan: Plan, model: str, secrets_env: dict[str, str], work: Path) -> tuple[Proxy, str]:
    folder = work / "litellm"
    folder.mkdir(parents=True, exist_ok=True)
    config = folder / "litellm_config.yaml"
    config.write_text(yaml.safe_dump(bare_litellm_config(plan, model), sort_keys=False, allow_unicode=True))
    port = free_port()
    argv = [
        sys.executable,
        "-m",
        "litellm.proxy.proxy_cli",
        "--config",
        str(config),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--num_workers",
        str(plan.gateway.workers),
    ]
    if plan.gateway.workers > 1:
        argv += ["--timeout_worker_healthcheck", "120"]
    return Proxy("litellm", argv, proxy_env(secrets_env), folder, folder / "proxy.log"), f"http://127.0.0.1:{port}/v1"


def start_guard_gateway(
    loaded: LoadedSpec, plan: Plan, secrets_env: dict[str, str], database_url: str, work: Path
) -> tuple[Proxy, str, bool]:
    """A second twllm gateway rendered from the spec with PII guards on input and output.

    Returns the proxy, its endpoint, and whether its LiteLLM config differs from the guard-less
    render (a check: False would mean the guard target runs the same hooks as twllm)."""
    from twllm.render.litellm_config import LITELLM_CONFIG, render
    from twllm.runtime.gateway import gateway_launch

    spec = loaded.spec
    guarded = spec.model_copy(
        update={"guard": spec.guard.model_copy(update={"input": list(GUARD_STAGES), "output": list(GUARD_STAGES)})}
    )
    unguarded = spec.model_copy(update={"guard": spec.guard.model_copy(update={"input": [], "output": []})})
    folder, plain = work / "gateway-guard", work / "gateway-noguard"
    render(plan, guarded, folder)
    render(plan, unguarded, plain)
    wired = (folder / LITELLM_CONFIG).read_text() != (plain / LITELLM_CONFIG).read_text()
    port = free_port()
    gw = plan.gateway.model_copy(update={"host": "127.0.0.1", "port": port, "url": f"http://127.0.0.1:{port}/v1"})
    launch = gateway_launch(gw, folder, secrets_env, database_url, work / "spool-guard")
    return (Proxy("twllm+guard", launch.argv, proxy_env(launch.env), folder, work / "gateway-guard.log"), gw.url, wired)


# --- the comparison -----------------------------------------------------------------------------


@dataclass
class Comparison:
    targets: dict[str, Target]
    summaries: dict[str, report.ModelSummary]
    rounds: list[dict[str, dict[str, float]]]
    settings: dict[str, Any]
    ledger: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def ratios(self) -> dict[str, dict[str, float | None]]:
        """Each target against direct and against litellm: E2EL/TTFT p50 and p90, tokens/s, req/s."""
        out: dict[str, dict[str, float | None]] = {}
        for name, s in self.summaries.items():
            row: dict[str, float | None] = {}
            for base in ("direct", "litellm"):
                b = self.summaries.get(base)
                if b is None:
                    continue
                for metric in ("e2el", "ttft"):
                    for p in ("p50", "p90"):
                        row[f"{metric}_{p}_vs_{base}"] = _ratio(_pct(s, metric, p), _pct(b, metric, p))
                row[f"toks_vs_{base}"] = _ratio(s.output_tokens_per_s, b.output_tokens_per_s)
                row[f"rps_vs_{base}"] = _ratio(s.requests_per_s, b.requests_per_s)
            out[name] = row
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "settings": self.settings,
            "targets": {n: {"endpoint": t.endpoint, "model": t.model, "note": t.note} for n, t in self.targets.items()},
            "summary": {n: s.to_dict() for n, s in self.summaries.items()},
            "ratios": self.ratios(),
            "rounds": self.rounds,
            "ledger": self.ledger,
            "notes": self.notes,
        }


def _pct(s: report.ModelSummary, metric: str, p: str) -> float | None:
    return (s.latency_ms.get(metric) or {}).get(p)


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def run_rounds(
    targets: dict[str, Target],
    settings: LoadSettings,
    load: Load,
    rounds: int,
    out: Path,
    say: Say,
    prompt_set: str = "zh-tw",
) -> tuple[dict[str, report.ModelSummary], list[dict]]:
    names = list(targets)
    pooled: dict[str, list[dict]] = {n: [] for n in names}
    durations: dict[str, float] = {n: 0.0 for n in names}
    per_round = []
    for number in range(rounds):
        order = names[number % len(names) :] + names[: number % len(names)]
        entry: dict[str, dict[str, float]] = {}
        for name in order:
            t = targets[name]
            result = run_locust(
                t.endpoint,
                dataclasses.replace(settings, models=(t.model,)),
                load,
                out / f"round{number + 1}",
                name=name.replace("+", "-"),
                api_key=t.api_key,
                prompt_set=prompt_set,
            )
            header, samples = report.read_samples(result.samples_file)
            duration = float(header["stopped"]) - float(header["started"])
            pooled[name] += samples
            durations[name] += duration
            (s,) = result.summaries or [report.ModelSummary(t.model, "chat", 0, 0, duration, 0)]
            entry[name] = {
                "e2el_p50_ms": _pct(s, "e2el", "p50") or 0.0,
                "ttft_p50_ms": _pct(s, "ttft", "p50") or 0.0,
                "output_tokens_per_s": s.output_tokens_per_s,
                "requests": s.requests,
                "errors": s.errors,
            }
            say(
                f"round {number + 1}/{rounds} {name:<12} {s.requests:5d} requests, {s.errors} errors, "
                f"E2EL p50 {entry[name]['e2el_p50_ms']:.1f} ms, TTFT p50 {entry[name]['ttft_p50_ms']:.1f} ms, "
                f"{s.output_tokens_per_s:.1f} output tok/s"
            )
        per_round.append(entry)
    summaries = {}
    for name in names:
        found = report.summarize(pooled[name], durations[name])
        summaries[name] = (
            found[0] if found else report.ModelSummary(targets[name].model, "chat", 0, 0, durations[name], 0)
        )
    return summaries, per_round


def compare(
    loaded: LoadedSpec,
    plan: Plan,
    settings: LoadSettings,
    load: Load,
    rounds: int,
    out: Path,
    say: Say,
    model: str | None = None,
    targets: tuple[str, ...] = TARGETS,
    keep: bool = False,
    prompt_set: str = "zh-tw",
) -> Comparison:
    """Deploy (or use the running deployment), start the extra proxies, run the rounds, clean up."""
    from twllm.accounting import store
    from twllm.accounting.dburl import connect
    from twllm.runtime.control import deploy, stop
    from twllm.runtime.database_url import database_url

    unknown = set(targets) - set(TARGETS)
    if unknown:
        raise ValueError(f"unknown target(s) {sorted(unknown)}; choose from {', '.join(TARGETS)}")
    model = model or plan.gateway.probe_model
    routes = [r for r in plan.routes if r.model_name == model and r.task == "chat"]
    if not model or not routes:
        chats = sorted({r.model_name for r in plan.routes if r.task == "chat"})
        raise ValueError(f"no chat model {model!r} in the spec (chat models: {', '.join(chats) or 'none'})")
    master_env = plan.gateway.master_key_env
    master_key = os.environ.get(master_env, "")
    if not master_key:
        raise RuntimeFailure(f"${master_env} is not set", hint=f"export {master_env} as for `twllm deploy`")
    out.mkdir(parents=True, exist_ok=True)
    work = out / "work"
    work.mkdir(exist_ok=True)
    sd = StateDir(Path(plan.state_dir))
    started_here = sd.supervisor_alive() is None
    proxies: list[Proxy] = []
    try:
        if started_here:
            say(f"deploying {plan.name} into {sd.root} (stopped again at the end)")
            t0 = time.monotonic()
            deploy(loaded, plan, sd, watch=lambda _state: None)
            say(f"deployed in {time.monotonic() - t0:.0f} s")
        else:
            say(f"using the running deployment in {sd.root}")
        engine_key = sd.engine_key()
        db_url = database_url(sd)
        secrets_env = {master_env: master_key, ENGINE_KEY_ENV: engine_key}
        tenant_name = f"bench-{secrets.token_hex(4)}"
        with connect(db_url) as conn:
            store.create_tenant(conn, tenant_name)
            key_record, tenant_key = store.create_key(conn, tenant_name)
        say(f"tenant {tenant_name}, key {key_record.prefix}…")

        chosen: dict[str, Target] = {}
        notes: list[str] = []
        if len(routes) > 1:
            notes.append(f"{model} has {len(routes)} replicas: direct loads only the first, the proxies all of them")
        if "direct" in targets:
            chosen["direct"] = Target("direct", routes[0].api_base.rstrip("/"), model, engine_key)
        if "litellm" in targets:
            proxy, url = start_bare_litellm(plan, model, secrets_env, work)
            proxies.append(proxy)
            chosen["litellm"] = Target("litellm", url, model, master_key)
        if "twllm" in targets:
            chosen["twllm"] = Target("twllm", plan.gateway.url.rstrip("/"), model, tenant_key)
        if "twllm+guard" in targets:
            proxy, url, wired = start_guard_gateway(loaded, plan, secrets_env, db_url, work)
            proxies.append(proxy)
            note = "guard input [pii], output [pii]"
            if not wired:
                note += " — NOT wired: the rendered LiteLLM config had no guard hooks"
                notes.append(
                    "twllm+guard: the rendered LiteLLM config had no guard hooks for this spec, "
                    "so this target ran the same hooks as twllm"
                )
            chosen["twllm+guard"] = Target("twllm+guard", url, model, tenant_key, note)
        proxy_of = {p.name: p for p in proxies}
        probes = {}
        for name, target in chosen.items():
            probes[name] = wait_for_chat(target, proxy=proxy_of.get(name))
        say("every target answers: " + ", ".join(f"{n} {t.endpoint}" for n, t in chosen.items()))

        summaries, per_round = run_rounds(chosen, settings, load, rounds, out, say, prompt_set)

        sent = sum(s.requests for n, s in summaries.items() if n.startswith("twllm"))
        sent += sum(probes[n] for n in chosen if n.startswith("twllm"))
        stored = _ledger_rows(db_url, key_record.id, sent)
        result = Comparison(
            chosen,
            summaries,
            per_round,
            {
                "model": model,
                "rounds": rounds,
                "users": load.users,
                "duration": load.duration,
                "max_tokens": settings.max_tokens,
                "stream": settings.stream,
                "ignore_eos": settings.ignore_eos,
                "gateway_workers": plan.gateway.workers,
                "spec": str(loaded.path) if loaded.path else None,
            },
            {"tenant_key_requests": sent, "ledger_rows": stored},
            notes,
        )
    finally:
        for proxy in proxies:
            proxy.stop()
        if started_here and not keep:
            say("stopping the deployment")
            stop(sd)
    return result


def _ledger_rows(db_url: str, key_id: int, expected: int, wait_s: float = 10.0) -> int:
    """Rows in the spend ledger for ``key_id``, waiting (up to ``wait_s``) for the writer to catch up."""
    from twllm.accounting.dburl import connect

    deadline = time.monotonic() + wait_s
    while True:
        with connect(db_url) as conn:
            row = conn.execute("SELECT count(*) FROM spend_ledger WHERE key_id = %s", (key_id,)).fetchone()
        assert row is not None  # count(*) yields one row
        (count,) = row
        if count >= expected or time.monotonic() > deadline:
            return int(count)
        time.sleep(0.5)


# --- text ---------------------------------------------------------------------------------------


def _f(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def table(result: Comparison) -> str:
    s, r = result.summaries, result.ratios()
    head = (
        f"{'target':<13}{'requests':>9}{'errors':>7}{'E2EL p50':>10}{'E2EL p90':>10}{'TTFT p50':>10}"
        f"{'TTFT p90':>10}{'out tok/s':>11}{'req/s':>8}"
    )
    lines = ["four-way comparison (latencies in ms)", head, "-" * len(head)]
    for name, m in s.items():
        lines.append(
            f"{name:<13}{m.requests:>9}{m.errors:>7}{_f(_pct(m, 'e2el', 'p50')):>10}"
            f"{_f(_pct(m, 'e2el', 'p90')):>10}{_f(_pct(m, 'ttft', 'p50')):>10}{_f(_pct(m, 'ttft', 'p90')):>10}"
            f"{m.output_tokens_per_s:>11.1f}{m.requests_per_s:>8.2f}"
        )
    for base in ("direct", "litellm"):
        if base not in s:
            continue
        head = (
            f"{'× ' + base:<13}{'E2EL p50':>10}{'E2EL p90':>10}{'TTFT p50':>10}{'TTFT p90':>10}"
            f"{'out tok/s':>11}{'req/s':>8}"
        )
        lines += ["", f"ratios vs {base}", head, "-" * len(head)]
        for name in s:
            if name == base:
                continue
            x = r[name]
            lines.append(
                f"{name:<13}{_f(x.get(f'e2el_p50_vs_{base}'), 3):>10}{_f(x.get(f'e2el_p90_vs_{base}'), 3):>10}"
                f"{_f(x.get(f'ttft_p50_vs_{base}'), 3):>10}{_f(x.get(f'ttft_p90_vs_{base}'), 3):>10}"
                f"{_f(x.get(f'toks_vs_{base}'), 3):>11}{_f(x.get(f'rps_vs_{base}'), 3):>8}"
            )
    lines.append("")
    gw = r.get("twllm", {})
    v = gw.get("e2el_p50_vs_litellm")
    if v is not None:
        lines.append(
            f"target: twllm E2EL p50 ≤ {TARGET_P50_VS_LITELLM}× litellm: {v:.3f} "
            f"({'met' if v <= TARGET_P50_VS_LITELLM else 'missed'})"
        )
    v = gw.get("toks_vs_direct")
    if v is not None:
        lines.append(
            f"target: twllm output tok/s ≥ {TARGET_TOKS_VS_DIRECT}× direct (at concurrency 16; "
            f"this run {result.settings['users']}): {v:.3f} ({'met' if v >= TARGET_TOKS_VS_DIRECT else 'missed'})"
        )
    if result.ledger:
        lines.append(
            f"ledger rows for the tenant key: {result.ledger['ledger_rows']} of "
            f"{result.ledger['tenant_key_requests']} requests sent with it"
        )
    for name, t in result.targets.items():
        if t.note:
            lines.append(f"{name}: {t.note}")
    lines += [f"note: {n}" for n in result.notes]
    return "\n".join(lines)


def chart(result: Comparison, path: Path) -> Path:
    """Bars per target: E2EL p50/p90, TTFT p50/p90 and output tokens/s."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(result.summaries)
    panels = [
        ("E2EL p50 (ms)", lambda m: _pct(m, "e2el", "p50")),
        ("E2EL p90 (ms)", lambda m: _pct(m, "e2el", "p90")),
        ("TTFT p50 (ms)", lambda m: _pct(m, "ttft", "p50")),
        ("output tokens/s", lambda m: m.output_tokens_per_s),
    ]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 4))
    for ax, (title, value) in zip(axes, panels):
        ax.bar(
            range(len(names)),
            [value(result.summaries[n]) or 0.0 for n in names],
            color=["tab:gray", "tab:blue", "tab:green", "tab:orange"][: len(names)],
        )
        ax.set_xticks(range(len(names)), names, rotation=20)
        ax.set_title(title)
    fig.suptitle(
        f"twllm bench compare: {result.settings['model']}, {result.settings['users']} users, "
        f"{result.settings['rounds']} rounds x {result.settings['duration']}"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
