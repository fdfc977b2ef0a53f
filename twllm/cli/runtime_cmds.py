"""Commands that run things: deploy, status, logs, stop."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import typer
from rich.console import Console
from rich.live import Live
from rich.table import Table

from twllm.cli.commands import CONFIG, GPUS, JSON, STATE_DIR, _state_dir, build_plan
from twllm.cli.output import stderr
from twllm.errors import RuntimeFailure
from twllm.runtime.control import NotReady
from twllm.runtime.control import deploy as run_deploy
from twllm.runtime.control import status as read_status
from twllm.runtime.control import stop as run_stop
from twllm.runtime.logs import tail
from twllm.runtime.state import DeploymentState, StateDir
from twllm.settings import STATE_DIR_ENV, Settings
from twllm.spec.resolve import load_spec

stdout = Console(highlight=False, soft_wrap=True)
STATE_DIR_FIND = typer.Option(
    None,
    "--state-dir",
    help=f"State directory of the deployment (default: from --config, ${STATE_DIR_ENV}, or the only per-user deployment).",
)
CONFIG_FIND = typer.Option(
    None, "--config", "-c", help="The spec the deployment was made from (to find its state directory)."
)


class _Progress:
    """Each component's state and elapsed time: a live table on a terminal, lines otherwise."""

    def __init__(self) -> None:
        self.started = time.monotonic()
        self.seen: dict[str, str] = {}
        self.live: Live | None = None
        if stderr.is_terminal:
            self.live = Live(console=stderr, transient=True, refresh_per_second=4)
            self.live.start()

    def __call__(self, state: DeploymentState) -> None:
        if self.live is not None:
            table = Table(title=f"deploying {state.name}: {state.status}", title_justify="left")
            for column in ("component", "state", "elapsed", "detail"):
                table.add_column(column)
            now = time.time()
            for c in state.components:
                since = c.started_at or now
                elapsed = (c.ready_at or now) - since if c.started_at else 0
                table.add_row(c.name, c.status, f"{elapsed:5.1f} s", c.detail[:60])
            self.live.update(table)
            return
        for c in state.components:
            key = f"{c.status}|{c.detail}"
            if self.seen.get(c.name) != key:
                self.seen[c.name] = key
                stderr.print(
                    f"[{time.monotonic() - self.started:6.1f} s] {c.name}: {c.status}"
                    + (f" — {c.detail}" if c.detail else ""),
                    markup=False,
                )

    def close(self) -> None:
        if self.live is not None:
            self.live.stop()


def deploy(
    config: Path = CONFIG,
    state_dir: Path | None = STATE_DIR,
    gpus: int | None = GPUS,
    foreground: bool = typer.Option(False, "--foreground", help="Stay attached; Ctrl-C stops everything."),
    json_out: bool = JSON,
) -> None:
    """Start the deployment (or apply a changed spec to the running one) and wait until it answers."""
    loaded, plan = build_plan(config, gpus, state_dir)  # an invalid spec stops here: nothing changes
    sd = StateDir(Path(plan.state_dir))
    progress = _Progress()
    try:
        result = run_deploy(loaded, plan, sd, watch=progress)
    except NotReady as exc:
        progress.close()
        if exc.log_tail:
            stderr.print(f"[dim]last lines of {exc.component}'s log:[/]")
            for line in exc.log_tail:
                stderr.print("  " + line, markup=False)
        raise
    finally:
        progress.close()
    info = read_status(sd)
    if json_out:
        typer.echo(json.dumps({**info, "mode": result.mode, "restarted": result.restarted}, indent=2))
    else:
        _print_ready(plan, sd, result)
    if foreground:
        _stay_attached(sd)


def _print_ready(plan, sd: StateDir, result) -> None:
    gw = plan.gateway
    if result.mode == "unchanged":
        stdout.print(f"[green]✓[/] {plan.name} is already running this spec; nothing changed")
    elif result.mode == "redeploy":
        changed = ", ".join(result.restarted) or "nothing"
        stdout.print(f"[green]✓[/] {plan.name} updated; restarted: {changed}")
    else:
        stdout.print(f"[green]✓[/] {plan.name} is ready")
    model = gw.probe_model or gw.probe_embed_model or "MODEL"
    stdout.print(f"  endpoint:  {gw.url}")
    stdout.print(f"  models:    {', '.join(sorted({r.model_name for r in plan.routes}))}")
    for label, url in _monitoring_urls(plan):
        stdout.print(f"  {label + ':':<10} {url}", markup=False)
    stdout.print("  try it:")
    if gw.probe_model:
        body = json.dumps(
            {"model": model, "messages": [{"role": "user", "content": "你好，請自我介紹"}]}, ensure_ascii=False
        )
        stdout.print(
            f'    curl {gw.url}/chat/completions -H "Authorization: Bearer ${gw.master_key_env}" '
            f"-H 'Content-Type: application/json' -d '{body}'",
            markup=False,
        )
    else:
        stdout.print(f'    curl {gw.url}/models -H "Authorization: Bearer ${gw.master_key_env}"', markup=False)
    stdout.print(
        f"  next:      twllm status --state-dir {sd.root}   ·   twllm stop --state-dir {sd.root}", markup=False
    )


def _monitoring_urls(plan) -> list[tuple[str, str]]:
    """Where an operator looks: the console, the gateway's /metrics, the embedded Prometheus."""
    root = plan.gateway.url.removesuffix("/v1")
    urls = [("console", f"{root}/console")]
    mon = plan.monitoring
    if mon is not None and mon.metrics_enabled:
        urls += [("metrics", f"{t.scheme}://{t.address}{t.path}") for t in mon.targets if t.job == "twllm-gateway"]
    if mon is not None and mon.prometheus is not None:
        urls.append(("prometheus", f"http://127.0.0.1:{mon.prometheus.port}/graph"))
    return urls


def _stay_attached(sd: StateDir) -> None:
    stderr.print("attached; Ctrl-C stops the deployment")
    try:
        while sd.supervisor_alive():
            time.sleep(1)
    except KeyboardInterrupt:
        stderr.print("stopping…")
        run_stop(sd)


def find_state_dir(state_dir: Path | None, config: Path | None) -> StateDir:
    """The deployment a read command means: --state-dir, the spec's, $TWLLM_STATE_DIR, or the only one."""
    if state_dir is not None:
        return StateDir(state_dir)
    if config is not None:
        return StateDir(_state_dir(load_spec(config), None))
    settings = Settings.from_env()
    if settings.state_dir is not None:
        return StateDir(settings.state_dir)
    root = settings.state_home / "twllm"
    found = sorted(p for p in root.glob("*") if (p / "state.json").exists()) if root.exists() else []
    if len(found) == 1:
        return StateDir(found[0])
    raise RuntimeFailure(
        "which deployment? " + ("none found" if not found else f"{len(found)} found in {root}"),
        hint="pass --state-dir DIR or --config FILE",
    )


def status(state_dir: Path | None = STATE_DIR_FIND, config: Path | None = CONFIG_FIND, json_out: bool = JSON) -> None:
    """Each component's health, restarts, uptime and port, and the gateway's URL."""
    sd = find_state_dir(state_dir, config)
    info = read_status(sd)
    if json_out:
        typer.echo(json.dumps(info, indent=2, ensure_ascii=False))
        return
    stdout.print(f"{info.get('name', sd.root.name)}: {info['status']}  ({info.get('gateway_url') or '-'})")
    if info.get("error"):
        stdout.print(f"  error: {info['error']}", markup=False)
    for c in info["components"]:
        uptime = f"{c['uptime_s']:.0f} s" if c["uptime_s"] is not None else "-"
        stdout.print(
            f"  {c['name']:<28} {c['status']:<12} port {c['port'] or '-':<6} restarts {c['restarts']:<3} "
            f"up {uptime:<8} {c['detail']}",
            markup=False,
        )


def logs(
    component: str = typer.Argument(..., help="Component name (see `twllm status`), or 'supervisor'."),
    state_dir: Path | None = STATE_DIR_FIND,
    config: Path | None = CONFIG_FIND,
    follow: bool = typer.Option(False, "--follow", "-f", help="Keep printing new lines."),
    lines: int = typer.Option(100, "--lines", "-n", help="How many lines to show first."),
) -> None:
    """Print a component's log."""
    sd = find_state_dir(state_dir, config)
    path = sd.supervisor_log if component == "supervisor" else sd.log_of(component)
    if not path.exists():
        known = sorted(p.stem for p in sd.logs.glob("*.log")) if sd.logs.exists() else []
        raise RuntimeFailure(f"no log for '{component}' in {sd.root}", hint=f"components: {', '.join(known) or 'none'}")
    for line in tail(path, lines):
        typer.echo(line)
    if follow:
        with open(path, "rb") as handle:
            handle.seek(0, 2)
            try:
                while True:
                    chunk = handle.readline()
                    if chunk:
                        sys.stdout.write(chunk.decode("utf-8", errors="replace"))
                        sys.stdout.flush()
                    else:
                        time.sleep(0.3)
            except KeyboardInterrupt:
                return


def stop(state_dir: Path | None = STATE_DIR_FIND, config: Path | None = CONFIG_FIND, json_out: bool = JSON) -> None:
    """Stop the gateway, then the engines, then the database."""
    sd = find_state_dir(state_dir, config)
    state = run_stop(sd)
    if json_out:
        typer.echo(json.dumps(read_status(sd), indent=2))
    elif state is None:
        stdout.print(f"nothing deployed in {sd.root}")
    else:
        stdout.print(f"[green]✓[/] {state.name} stopped")


def register(app: typer.Typer) -> None:
    """Add deploy, status, logs and stop to the root command."""
    for command in (deploy, status, logs, stop):
        app.command()(command)
