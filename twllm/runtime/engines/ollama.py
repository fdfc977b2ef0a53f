"""Ollama driver: runs `ollama serve` and pulls or creates the plan's models through its HTTP API.

Facts of Ollama's API this relies on (docs/api.md and server/routes.go in github.com/ollama/ollama):

- `GET /` answers 200 "Ollama is running". `GET /api/tags` lists local models; each entry's `name`
  and `model` are the shortest display name, so a pulled `llama3.2` is listed as `llama3.2:latest`.
- `POST /api/pull {"model", "stream": true}` streams NDJSON progress objects (`status`, and for
  layers `digest`, `total`, `completed`) ending in `{"status": "success"}`. An error after the
  stream began is a line `{"error": "..."}` under HTTP 200; one before it a non-200 JSON body.
  (`model` replaced the older `name`; the server still accepts both.)
- A local GGUF file is uploaded as a blob, `POST /api/blobs/sha256:<hex>` (201 created, 200 already
  there, 400 digest mismatch; `HEAD` answers 200 or 404), then named with `POST /api/create
  {"model", "files": {"<file name>": "sha256:<hex>"}, "stream": true}`, which streams like a pull.
  `/api/create` no longer takes a Modelfile.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import httpx

from twllm.errors import RuntimeFailure
from twllm.plan.model import EngineProcess
from twllm.runtime.engines.base import Launch, Progress, RuntimeContext
from twllm.runtime.state import mkdir_private
from twllm.settings import OLLAMA_BIN_ENV, Settings

INSTALL_HINT = (
    f"install Ollama from https://ollama.com/download, or set {OLLAMA_BIN_ENV} to the path of the ollama executable"
)
PULL_HINT = "check the tag at https://ollama.com/library; pulling needs access to registry.ollama.ai"

PROBE_TIMEOUT_S = 2.0
"""One readiness probe; the supervisor polls `ready` again and again."""
SERVER_WAIT_S = 60.0
"""How long `provision` waits for the server to answer at all."""
TRANSFER_TIMEOUT = httpx.Timeout(30.0, read=900.0)
"""Pulls and creates go quiet for minutes while Ollama verifies or converts a multi-GB layer."""
CHUNK_BYTES = 1 << 20
PERCENT_STEP = 10
"""Progress is reported when the status changes or its percentage advances by this much."""

_DEFAULT_PREFIXES = ("registry.ollama.ai/library/", "library/")


def canonical_name(name: str) -> str:
    """The name Ollama lists a model under: lower case, default registry dropped, ':latest' added
    when no tag is given ('Phi4-Mini' -> 'phi4-mini:latest')."""
    name = name.strip().lower()
    for prefix in _DEFAULT_PREFIXES:
        if name.startswith(prefix):
            name = name[len(prefix) :]
            break
    last = name.rsplit("/", 1)[-1]
    return name if ":" in last else f"{name}:latest"


def listed_names(tags: Any) -> set[str]:
    """Canonical names of the models in an `/api/tags` answer (its `name` and `model` fields)."""
    models = tags.get("models") if isinstance(tags, Mapping) else None
    found: set[str] = set()
    for entry in models if isinstance(models, list) else []:
        if isinstance(entry, Mapping):
            found.update(canonical_name(v) for k in ("name", "model") if isinstance(v := entry.get(k), str) and v)
    return found


def missing_models(provision: Iterable[Mapping[str, str]], tags: Any) -> list[str]:
    """Names of the provisioned models an `/api/tags` answer does not list, in plan order."""
    present = listed_names(tags)
    return [e["name"] for e in provision if canonical_name(e["name"]) not in present]


class OllamaDriver:
    """Runs one `ollama serve` and makes sure every model of the plan exists in it."""

    def __init__(self, settings: Settings | None = None, *, server_wait_s: float = SERVER_WAIT_S) -> None:
        self._settings = settings
        self.server_wait_s = server_wait_s

    def launch(self, proc: EngineProcess, ctx: RuntimeContext) -> Launch:
        configured = (self._settings or Settings.from_env()).ollama_bin
        exe = shutil.which(configured)
        if exe is None:
            where = "on PATH" if configured == "ollama" else f"at {OLLAMA_BIN_ENV}={configured}"
            raise RuntimeFailure(f"{proc.id}: no ollama executable {where}", hint=INSTALL_HINT)
        env = dict(proc.env)
        if models_dir := env.get("OLLAMA_MODELS"):
            try:
                mkdir_private(Path(models_dir))  # in the state dir: 0700 like the rest of it
            except OSError as exc:
                raise RuntimeFailure(
                    f"{proc.id}: cannot create the model directory {models_dir}: {exc.strerror}"
                ) from exc
        return Launch(argv=[exe, *proc.argv[1:]], env=env)

    def ready(self, proc: EngineProcess, ctx: RuntimeContext) -> bool:
        try:
            response = httpx.get(proc.ready_url, timeout=PROBE_TIMEOUT_S, trust_env=False)
            return response.status_code == 200 and not missing_models(proc.provision, response.json())
        except (httpx.HTTPError, ValueError):
            return False

    def provision(self, proc: EngineProcess, ctx: RuntimeContext, progress: Progress) -> None:
        base = f"http://{proc.host}:{proc.port}"
        with httpx.Client(base_url=base, timeout=TRANSFER_TIMEOUT, trust_env=False) as client:
            self._wait_until_up(client, proc, progress)
            try:
                present = listed_names(client.get("/api/tags").json())
                for entry in proc.provision:
                    name = entry["name"]
                    if canonical_name(name) in present:
                        progress(f"{name}: already in ollama")
                    elif "pull" in entry:
                        _pull(client, entry["pull"], progress)
                    elif "gguf" in entry:
                        _create_from_gguf(client, name, Path(entry["gguf"]), progress)
                    else:
                        raise RuntimeFailure(f"{proc.id}: provision entry {dict(entry)} has neither 'pull' nor 'gguf'")
            except (httpx.HTTPError, ValueError) as exc:
                raise RuntimeFailure(
                    f"{proc.id}: ollama at {base} stopped answering while provisioning: {exc}"
                ) from exc
            except OSError as exc:
                raise RuntimeFailure(f"{proc.id}: cannot read {exc.filename or 'a GGUF file'}: {exc.strerror}") from exc

    def _wait_until_up(self, client: httpx.Client, proc: EngineProcess, progress: Progress) -> None:
        deadline = time.monotonic() + self.server_wait_s
        told = False
        while True:
            try:
                response = client.get("/", timeout=PROBE_TIMEOUT_S)
            except httpx.HTTPError:
                response = None
            if response is not None:
                if _is_ollama(client, response):
                    return
                raise RuntimeFailure(
                    f"{proc.id}: port {proc.port} answers, but not as Ollama (HTTP {response.status_code})",
                    hint="another program holds the port; stop it or give ollama another `port`",
                )
            if time.monotonic() >= deadline:
                raise RuntimeFailure(
                    f"{proc.id}: ollama did not answer at {client.base_url} within {self.server_wait_s:.0f} s"
                )
            if not told:
                progress(f"waiting for ollama at {client.base_url}")
                told = True
            time.sleep(0.2)


def _is_ollama(client: httpx.Client, root: httpx.Response) -> bool:
    """`GET /` says "Ollama is running"; failing that, `/api/version` answers with a version."""
    if root.status_code == 200 and "Ollama is running" in root.text:
        return True
    try:
        version = client.get("/api/version", timeout=PROBE_TIMEOUT_S)
        return version.status_code == 200 and bool(version.json().get("version"))
    except (httpx.HTTPError, ValueError, AttributeError):
        return False


def _pull(client: httpx.Client, tag: str, progress: Progress) -> None:
    with client.stream("POST", "/api/pull", json={"model": tag, "stream": True}) as response:
        failure = _follow(response, lambda line: progress(f"{tag}: {line}"))
    if failure:
        raise RuntimeFailure(f"ollama could not pull {tag!r}: {failure}", hint=PULL_HINT)


def _create_from_gguf(client: httpx.Client, name: str, path: Path, progress: Progress) -> None:
    if not path.is_file():
        raise RuntimeFailure(f"ollama model {name!r}: the GGUF file {path} does not exist")
    progress(f"{name}: hashing {path.name}")
    digest = "sha256:" + _sha256(path)
    exists = client.head(f"/api/blobs/{digest}")
    if exists.status_code == 404:
        _upload(client, path, digest, lambda line: progress(f"{name}: {line}"))
    elif exists.status_code != 200:
        raise RuntimeFailure(f"ollama could not check blob {digest} of {path}: HTTP {exists.status_code}")
    body = {"model": name, "files": {path.name: digest}, "stream": True}
    with client.stream("POST", "/api/create", json=body) as response:
        failure = _follow(response, lambda line: progress(f"{name}: {line}"))
    if failure:
        raise RuntimeFailure(f"ollama could not create {name!r} from {path}: {failure}")


def _upload(client: httpx.Client, path: Path, digest: str, report: Callable[[str], None]) -> None:
    size = path.stat().st_size

    def chunks() -> Iterator[bytes]:
        sent, next_report = 0, 0
        with path.open("rb") as f:
            while chunk := f.read(CHUNK_BYTES):
                sent += len(chunk)
                yield chunk
                if (percent := sent * 100 // max(size, 1)) >= next_report:
                    report(f"uploading {path.name} {percent}%")
                    next_report = percent - percent % PERCENT_STEP + PERCENT_STEP

    # An explicit Content-Length keeps httpx from sending the generator chunked.
    response = client.post(f"/api/blobs/{digest}", content=chunks(), headers={"Content-Length": str(size)})
    if response.status_code not in (200, 201):
        raise RuntimeFailure(f"ollama refused the upload of {path}: {_error_text(response)}")


def _follow(response: httpx.Response, report: Callable[[str], None]) -> str | None:
    """Read one NDJSON progress stream (pull, create) and report its lines, thinned out: each new
    status, then every PERCENT_STEP percent. Returns the failure, or None once it said 'success'."""
    if response.status_code != 200:
        response.read()
        return _error_text(response)
    last_status: str | None = None
    last_percent: int | None = None
    for line in response.iter_lines():
        if not line.strip():
            continue
        try:
            message = json.loads(line)
        except ValueError:
            return f"unreadable progress line {line[:200]!r}"
        if not isinstance(message, dict):
            continue
        if message.get("error"):
            return str(message["error"])
        status, percent = str(message.get("status", "")), _percent(message)
        if status != last_status:
            report(status if percent is None else f"{status} {percent}%")
            last_percent = percent
        elif percent is not None and (
            last_percent is None or percent >= last_percent + PERCENT_STEP or percent == 100 > last_percent
        ):
            report(f"{status} {percent}%")
            last_percent = percent
        last_status = status
    return None if last_status == "success" else "the progress stream ended before 'success'"


def _percent(message: Mapping[str, Any]) -> int | None:
    """How far a layer is, when the line says (`completed` is left out until bytes arrive)."""
    total, completed = message.get("total"), message.get("completed", 0)
    if isinstance(total, int) and total > 0 and isinstance(completed, int):
        return min(completed * 100 // total, 100)
    return None


def _error_text(response: httpx.Response) -> str:
    """Ollama's error message: `{"error": "..."}` natively, `{"error": {"message": ...}}` on /v1."""
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, dict):
            error = error.get("message")
        if isinstance(error, str) and error:
            return error
    text = response.text.strip()
    return f"HTTP {response.status_code}" + (f": {text[:200]}" if text else "")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()
