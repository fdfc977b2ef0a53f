"""The gateway's entry point: ``python -m twllm.gateway.serve --config litellm_config.yaml ...``.

Runs LiteLLM's proxy app behind twllm's shield (``asgi.py``) with uvicorn: one process, or a
supervisor with ``--workers`` processes that each import the app. LiteLLM's own command line is
not used: it would serve the bare proxy app, and with it every internal route.

Before the workers start it empties the Prometheus multiprocess folder (``PROMETHEUS_MULTIPROC_DIR``,
set by the supervisor; a private temporary one when metrics are on and it is not set) and, when
gateway.json puts /metrics on a port of its own, starts that listener in this process.
"""

from __future__ import annotations

import argparse
import atexit
import faulthandler
import os
import shutil
import sys
import tempfile
from pathlib import Path

from twllm.gateway.settings import GatewaySettings
from twllm.settings import GATEWAY_HTTP_ENV, GATEWAY_SETTINGS_ENV, PROMETHEUS_MULTIPROC_DIR_ENV

WORKER_HEALTHCHECK_S = 120
"""uvicorn kills a new worker that has not answered its health ping within 5 s by default, and
importing the proxy takes longer on a small machine: the ping gets this long instead."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m twllm.gateway.serve", description=__doc__)
    parser.add_argument("--config", required=True, type=Path, help="the rendered LiteLLM config")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=4000)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--ssl-certfile", type=Path, help="PEM certificate chain: serve HTTPS")
    parser.add_argument("--ssl-keyfile", type=Path, help="PEM private key of --ssl-certfile")
    args = parser.parse_args(argv)
    if (args.ssl_certfile is None) != (args.ssl_keyfile is None):
        parser.error("--ssl-certfile and --ssl-keyfile go together")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    config = args.config.resolve()
    if not config.is_file():
        sys.exit(f"twllm gateway: no LiteLLM config at {config}")
    # The proxy's startup reads its config from here (each worker does, on import of the app).
    os.environ["CONFIG_FILE_PATH"] = str(config)
    os.environ["NUM_WORKERS"] = str(args.workers)
    # A worker that crashes in C code (CI once saw one segfault in libpython while PostgreSQL was
    # stopped under load) prints its Python stack to the log: workers are spawned and inherit it.
    os.environ.setdefault("PYTHONFAULTHANDLER", "1")
    faulthandler.enable()
    # Our hooks are imported by module name relative to the config's folder first.
    sys.path.insert(0, str(config.parent))
    prepare_metrics(args.host)
    import uvicorn

    options: dict[str, object] = {
        "host": args.host,
        "port": args.port,
        "workers": args.workers,
        "server_header": False,
        "date_header": True,
        "timeout_graceful_shutdown": 30,
        "log_level": "info",
        # httptools when installed (a dependency); TWLLM_GATEWAY_HTTP=h11 is a diagnostic that
        # benchmarks/gateway_cpu.py --ablation uses to measure what the C parser saves.
        "http": os.environ.get(GATEWAY_HTTP_ENV, "auto"),
    }
    try:
        import uvloop  # noqa: F401

        options["loop"] = "uvloop"
    except ImportError:  # pragma: no cover - Windows
        pass
    if args.workers > 1:
        options["timeout_worker_healthcheck"] = WORKER_HEALTHCHECK_S
    if args.ssl_certfile is not None:
        options["ssl_certfile"] = str(args.ssl_certfile)
        options["ssl_keyfile"] = str(args.ssl_keyfile)
    uvicorn.run("twllm.gateway.asgi:app", **options)  # type: ignore[arg-type]


def prepare_metrics(host: str) -> None:
    """An empty multiprocess folder for this start, and the separate /metrics listener if any.

    The folder is named in the environment before prometheus_client is imported: it picks its
    per-process value files then (in this process, and in every worker, which inherit it)."""
    path = os.environ.get(GATEWAY_SETTINGS_ENV)
    try:
        metrics = GatewaySettings.load(path).metrics if path else None
    except (OSError, ValueError) as exc:
        sys.exit(f"twllm gateway: cannot read the gateway settings {path}: {exc}")
    folder = os.environ.get(PROMETHEUS_MULTIPROC_DIR_ENV)
    if not folder and metrics is not None and metrics.enabled:
        # Without the folder each worker would answer with its own counts only.
        folder = tempfile.mkdtemp(prefix="twllm-gateway-metrics-")
        atexit.register(shutil.rmtree, folder, True)
        os.environ[PROMETHEUS_MULTIPROC_DIR_ENV] = folder
    from twllm.gateway import scrape

    if folder:
        scrape.prepare_folder(Path(folder))
    if metrics is not None and metrics.enabled and metrics.port is not None:
        try:
            scrape.start_listener(host, metrics.port)
        except OSError as exc:
            sys.exit(f"twllm gateway: cannot serve /metrics on {host}:{metrics.port}: {exc}")


if __name__ == "__main__":
    main()
