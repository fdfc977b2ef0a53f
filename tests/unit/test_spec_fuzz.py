"""Fuzzed specs (issue 18): whatever a spec file holds, twllm answers with a plan or with errors
that each name the file, the line and the field (`file:line field.path: message`), never with a
traceback; and `twllm deploy` with a broken spec leaves the deployment's state untouched.

The specs are valid ones (the two examples and a spec using most fields) changed at random:
wrong types, out-of-range and huge numbers, NaN, long strings, control characters, unknown and
missing fields, duplicate keys, YAML anchors, aliases and merge keys, deep nesting, then cut,
spliced, tab-indented, BOM-prefixed or re-encoded (non-UTF-8) as a file. Every property runs
derandomized (`derandomize=True`, no example database), so CI sees the same specs every run;
the number of specs each property checked is printed and recorded as a junit property.

The bugs the fuzzing found are pinned by the plain tests at the end, one minimal spec each.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from ruamel.yaml import YAML

from twllm.cli import runtime_cmds
from twllm.cli.app import main
from twllm.cli.commands import build_plan
from twllm.errors import EXIT_INVALID, PlanError, SpecError
from twllm.plan.model import Plan

ROOT = Path(__file__).resolve().parents[2]
MASTER_KEY = "sk-fuzz-master"
ENV = {"TWLLM_MASTER_KEY": MASTER_KEY, "DATABASE_URL": "postgresql://twllm@db.internal:5432/twllm"}

RICH = """\
# Most fields of the spec, valid together (examples/*.yaml cover the rest).
name: fuzz-rich
state_dir: ./state
gateway:
  host: 0.0.0.0
  port: 4000
  workers: 2
  master_key: ${TWLLM_MASTER_KEY}
  request_timeout_s: 300
  num_retries: 2
  routing_strategy: latency
  cooldown_s: 10
  allowed_fails: 3
  health_check_interval_s: 30
  aliases: {gpt-4o-mini: chat}
  fallbacks: {chat: [small]}
  context_window_fallbacks: {small: [chat]}
  start_timeout_s: 120
  max_request_bytes: 1048576
  tls: {cert: tls/gw.pem, key: tls/gw.key}
  cors_origins: [https://app.example.tw]
database:
  port: 15433
  ledger_retention_days: 90
hardware: {gpus: 4, gpu_memory_gib: 80}
guard:
  input: [pii, prompt_guard]
  output: [zh_tw]
  pii: {action: mask, entities: [tw_national_id, email], actions: {email: log}}
  prompt_guard: {threshold: 0.7}
  stream_window: 100
  zh_tw: {system_prompt: 請使用臺灣繁體中文回答。, structured: values}
  policies:
    strict: {input: [pii], pii: {action: block}}
ollama: {port: 11500, num_parallel: 2, keep_alive: 5m, max_loaded_models: 2, context_length: 4096}
engines: {host: 127.0.0.1, port_base: 8200, start_timeout_s: 600}
monitoring:
  metrics: {enabled: true, port: 9400}
  prometheus: embedded
  prometheus_port: 9091
  scrape_interval_s: 30
  retention_days: 7
kubernetes:
  namespace: fuzz
  gateway: {replicas: 2, max_replicas: 4, cpu: "2", memory: 4Gi}
  keda: {enabled: true, queue_per_replica: 3}
models:
  - name: chat
    model: llama-3.1-8b-instruct
    tensor_parallel: 2
    replicas: 2
    max_model_len: 8192
    dtype: bfloat16
    gpu_memory_utilization: 0.85
    engine_args: {enable-chunked-prefill: true, max-num-seqs: 64}
    price: {input_per_1m: 3.0, output_per_1m: 6.0, currency: TWD}
    rpm: 600
    tpm: 100000
    port: 8300
    zh_tw: true
  - name: small
    source: {ollama: phi4-mini}
    system_prompt: 你好
    guard: {input: [pii]}
  - name: embedder
    source: {hf: BAAI/bge-m3}
    task: embed
    device: cpu
  - name: local-gguf
    source: {gguf: models/x.gguf}
"""

BASES = {
    "prod": (ROOT / "examples" / "prod.yaml").read_text(encoding="utf-8"),
    "local": (ROOT / "examples" / "local.yaml").read_text(encoding="utf-8"),
    "rich": RICH,
}
BASE_DATA = {name: YAML(typ="safe").load(text) for name, text in BASES.items()}

# Problems about the document as a whole have no field path: `file:line: message`.
WHOLE_FILE = re.compile(
    r"^(YAML syntax error|the file is empty|the top level must be|cannot read file: not UTF-8 text"
    r"|the document nests too deep)"
)

# --- a small YAML writer that can produce what a YAML library's dumper never would ------------------


@dataclass(frozen=True)
class Raw:
    """A scalar written exactly as given (plain YAML: a date, 0x…, .nan, a tag)."""

    text: str


@dataclass(frozen=True)
class Key:
    """A mapping key written as given; lets one mapping hold `<<` or the same key twice."""

    text: str
    n: int = 0


@dataclass(frozen=True)
class Anchor:
    name: str
    value: Any


@dataclass(frozen=True)
class Alias:
    name: str


@dataclass(frozen=True)
class Flow:
    """A collection written in flow style, `{a: 1}` / `[1, 2]`."""

    value: Any


_PLAIN = re.compile(r"[A-Za-z_/$][A-Za-z0-9_./${}-]*")
_YAML_WORDS = {"true", "false", "null", "yes", "no", "on", "off", "y", "n", "~"}


def scalar(value: Any, *, flow: bool = False) -> str:
    if isinstance(value, (Raw, Key)):
        return value.text
    if isinstance(value, Alias):
        return f"*{value.name}"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if value != value:
            return ".nan"
        if value in (float("inf"), float("-inf")):
            return ".inf" if value > 0 else "-.inf"
        return repr(value)
    text = str(value)
    if not flow and _PLAIN.fullmatch(text) and text.lower() not in _YAML_WORDS:
        return text
    return json.dumps(text, ensure_ascii=True)  # a JSON string is a YAML double-quoted scalar


def flow_text(value: Any) -> str:
    if isinstance(value, Anchor):
        return f"&{value.name} {flow_text(value.value)}"
    if isinstance(value, Flow):
        value = value.value
    if isinstance(value, dict):
        return "{" + ", ".join(f"{scalar(k, flow=True)}: {flow_text(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(flow_text(v) for v in value) + "]"
    return scalar(value, flow=True)


def block_lines(value: dict | list, indent: int) -> list[str]:
    pad = " " * indent
    lines: list[str] = []
    items = value.items() if isinstance(value, dict) else ((None, v) for v in value)
    for key, item in items:
        lead = f"{pad}{scalar(key)}:" if isinstance(value, dict) else f"{pad}-"
        anchor = ""
        if isinstance(item, Anchor):
            anchor, item = f" &{item.name}", item.value
        if isinstance(item, (dict, list)) and item and not isinstance(item, Flow):
            lines.append(lead + anchor)
            lines += block_lines(item, indent + 2)
        elif isinstance(item, (dict, list, Flow)):
            lines.append(f"{lead}{anchor} {flow_text(item)}")
        else:
            lines.append(f"{lead}{anchor} {scalar(item)}")
    return lines


def to_yaml(doc: Any) -> str:
    if isinstance(doc, dict) and doc:
        return "\n".join(block_lines(doc, 0)) + "\n"
    return flow_text(doc) + "\n"


# --- mutations of a spec's data -------------------------------------------------------------------

PathT = tuple[Any, ...]


def paths(node: Any, at: PathT = ()) -> Iterator[PathT]:
    """Every path below the root: mapping keys and list indexes."""
    children = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, child in children:
        yield (*at, key)
        yield from paths(child, (*at, key))


def get(node: Any, path: PathT) -> Any:
    for part in path:
        node = node[part]
    return node


def put(node: Any, path: PathT, value: Any) -> None:
    get(node, path[:-1])[path[-1]] = value


def copy(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: copy(v) for k, v in node.items()}
    if isinstance(node, list):
        return [copy(v) for v in node]
    return node


HOSTILE: list[Any] = [
    0,
    -1,
    1,
    2**31,
    2**63,
    2**64 + 1,
    10**30,
    -(10**30),
    10**999,
    Raw("9" * 5000),  # more digits than Python reads
    Raw("0x" + "f" * 4000),  # reads, but has ~4800 decimal digits
    Raw("0b" + "1" * 70),
    Raw("0o777"),
    Raw("1_000"),
    Raw(".nan"),
    Raw(".inf"),
    Raw("-.inf"),
    Raw("1e400"),
    1e308,
    -0.0,
    5e-324,
    Raw("2024-13-45"),  # YAML's timestamp pattern, not a date
    Raw("2024-02-30"),
    Raw("2024-01-01"),
    Raw("2001-12-14t21:59:43.10-05:00"),
    Raw("12:30:00"),
    Raw("!!binary aGVsbG8="),
    Raw("!!binary not-base64!"),
    Raw("!!python/object:os.system {}"),
    Raw("!foo bar"),
    Raw("!!set {a, b}"),
    Raw("!!omap [a: 1]"),
    Raw("!!float abc"),
    Raw("!!int 1.5"),
    Raw("!!str"),
    Raw("~"),
    Raw("''"),
    Raw('""'),
    Raw("yes"),
    Raw("NO"),
    Raw("on"),
    Raw("|\n  a block\n  scalar"),
    Raw("*nowhere"),
    Raw("&lonely"),
    Raw("[unclosed"),
    Raw("{a: 1"),
    Raw("'open"),
    Raw("@reserved"),
    Raw("`tick"),
    Raw("%percent"),
    "${UNSET_FUZZ_VAR}",
    "${TWLLM_MASTER_KEY}",
    "${TWLLM_MASTER_KEY:-sk-default}",
    "${UNSET_FUZZ_VAR:-}",
    "$$",
    "${",
    "${1BAD}",
    "~nosuchuser-twllm-fuzz/x",
    "~",
    "~/x",
    "/dev/null",
    "../../etc/passwd",
    "\0",
    "a\x00b",
    "\ud800",
    "x\udfffy",
    "\x1b[31mred",
    "\u202eevil",
    "\x7f",
    "\x85",
    "\u2028",
    "\ufeff",
    "é" * 1000,
    "a" * 100_000,
    "\t",
    "\n\nx\n",
    " leading",
    "sk-abc",
    "s" * 65,
    "0.0.0.0",
    "::",
    "llama-3.1-8b-instruct",
    "bge-m3",
    "phi-4-mini-instruct",
    "llama-guard-3-1b",
    "llama-prompt-guard-2-86m",
    "ollama",
    "vllm",
    "cpu",
    "embed",
    "rerank",
    "pii",
    "zh_tw",
    "llama_guard",
    "prompt_guard",
    "block",
    "postgresql://u:pw@h/db",
    "org/repo",
    [],
    {},
    [None],
    {"": None},
    [[[]]],
    Flow({"a": [1, {"b": None}]}),
]

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
)
bad_values = st.one_of(
    st.sampled_from(HOSTILE),
    scalars,
    st.lists(scalars, max_size=3),
    st.dictionaries(st.text(max_size=6), scalars, max_size=3),
)
keys = st.one_of(
    st.sampled_from(["gatway", "replica", "modle", "", "x-extra", "1", "name ", "Name", "gpus", "<<"]),
    st.text(max_size=12),
    st.integers(min_value=-5, max_value=2**64),
    st.booleans(),
    st.none(),
)
OPS = ("replace", "replace", "replace", "add", "delete", "duplicate", "deepen", "reanchor")


def mutate(draw: Any, doc: dict) -> tuple[Any, list[str]]:
    """Apply 1-3 random changes to a copy of ``doc``; return it and what was done."""
    doc = copy(doc)
    done: list[str] = []
    for _ in range(draw(st.integers(1, 3))):
        op = draw(st.sampled_from(OPS))
        everywhere = list(paths(doc))
        if not everywhere:
            break
        where = draw(st.sampled_from(everywhere))
        parent = get(doc, where[:-1])
        if op == "replace":
            put(doc, where, draw(bad_values))
        elif op == "add":
            target = get(doc, where)
            target = target if isinstance(target, dict) else parent if isinstance(parent, dict) else doc
            target[draw(keys)] = draw(bad_values)
        elif op == "delete":
            del parent[where[-1]]
        elif op == "duplicate" and isinstance(parent, dict):
            # The same key twice: the copy repeats it, or changes the value.
            twin = draw(st.one_of(st.just(parent[where[-1]]), bad_values))
            rebuilt: dict = {}
            for k, v in parent.items():
                rebuilt[k] = v
                if k == where[-1]:
                    rebuilt[Key(scalar(k), 1)] = twin
            parent.clear()
            parent.update(rebuilt)
        elif op == "deepen":
            depth = draw(st.sampled_from([2, 10, 63, 64, 65, 100]))
            value: Any = draw(scalars)
            for level in range(depth):
                value = {"a": value} if level % 2 else [value]
            put(doc, where, value if draw(st.booleans()) else Flow(value))
        elif op == "reanchor":
            # A value moved behind an anchor and used again elsewhere through an alias.
            other = draw(st.sampled_from(everywhere))
            if other[: len(where)] == where or where[: len(other)] == other:
                continue
            name = f"a{len(done)}"
            put(doc, where, Anchor(name, get(doc, where)))
            put(doc, other, Alias(name))
        done.append(f"{op} {where}")
    return doc, done


def merge_keys(draw: Any, doc: dict) -> tuple[Any, list[str]]:
    """Rewrite mappings with YAML merge keys (`<<`): some of a mapping's own keys moved into an
    inline `<<: {…}`, or one model built from another as `<<: *anchor` plus its own keys."""
    doc = copy(doc)
    done = []
    mappings = [p for p in paths(doc) if isinstance(get(doc, p), dict) and get(doc, p)]
    for where in [] if not mappings else draw(st.lists(st.sampled_from(mappings), min_size=1, max_size=2, unique=True)):
        try:
            mapping = get(doc, where)
        except (KeyError, IndexError, TypeError):
            continue  # under a mapping rewritten just before
        if not isinstance(mapping, dict) or not mapping:
            continue
        moved = draw(st.lists(st.sampled_from(list(mapping)), min_size=1, unique=True))
        merged = {k: mapping[k] for k in moved}
        rest = {k: v for k, v in mapping.items() if k not in moved}
        source = merged if draw(st.booleans()) else Flow(merged)
        put(doc, where, {Key("<<"): source, **rest} if draw(st.booleans()) else {**rest, Key("<<"): source})
        done.append(f"merge {where} <- {moved}")
    models = doc.get("models")
    if isinstance(models, list) and len(models) >= 2 and all(isinstance(m, dict) for m in models):
        i, j = sorted(draw(st.lists(st.integers(0, len(models) - 1), min_size=2, max_size=2, unique=True)))
        if draw(st.booleans()):
            keep = draw(st.lists(st.sampled_from(list(models[j])), unique=True))
            models[i] = Anchor("base", models[i])
            models[j] = {Key("<<"): Alias("base"), **{k: models[j][k] for k in keep}}
            done.append(f"models[{j}] = <<: *models[{i}] + {keep}")
    return doc, done


@st.composite
def mutated_specs(draw: Any) -> tuple[str, bytes, list[str]]:
    base = draw(st.sampled_from(sorted(BASE_DATA)))
    doc, done = mutate(draw, BASE_DATA[base])
    if draw(st.integers(0, 3)) == 0:
        doc, more = merge_keys(draw, doc)
        done += more
    return base, to_yaml(doc).encode("utf-8"), done


# --- changes to the file's text and bytes ---------------------------------------------------------

WHOLE_FILES = [
    b"",
    b"\n\n",
    b"   ",
    b"# just a comment\n",
    b"---\n",
    b"...\n",
    b"null\n",
    b"~\n",
    b"[]\n",
    b"{}\n",
    b"'a string'\n",
    b"- a\n- b\n",
    b"42\n",
    b"name: t\n---\nname: u\n",
    b"%YAML 1.1\n---\nname: t\n",
    b"%YAML 2.0\n---\nname: t\n",
    b"%TAG ! tag:example.com,2000:\n---\nname: !x t\n",
    b"\xef\xbb\xbf",
    b"\xff\xfe\x00\x00",
    b"\x00",
    b"\t",
    b"a: &x [*x]\n",
    b"&x a: *x\n",
    b"? [a, b]\n: 1\n",
    b"? {a: 1}\n: 1\n",
]
INSERTS = ["\t", ":", ": ", "-", "- ", "[", "]", "{", "}", "&a ", "*a", "!", "!!", "%", "#", '"', "'", "|", ">", "?",
           "\x00", "\x01", "\x1b", "\x7f", "\u0085", "\ufeff", "\u2028", "\r", "\r\n", "\n", " ", "  ", "<<: ",
           "<<: *a\n", "---\n", "...\n", "@", "`", ",", "\\", "\ud800"]  # fmt: skip


@st.composite
def damaged_files(draw: Any) -> tuple[str, bytes, list[str]]:
    if draw(st.integers(0, 9)) == 0:
        data = draw(st.sampled_from(WHOLE_FILES))
        return "whole", data, [f"whole file {data[:20]!r}"]
    base = draw(st.sampled_from(sorted(BASES)))
    text = BASES[base] if draw(st.booleans()) else to_yaml(mutate(draw, BASE_DATA[base])[0])
    done = []
    for _ in range(draw(st.integers(1, 3))):
        op = draw(st.sampled_from(["truncate", "insert", "delete", "tab", "bom", "crlf", "swap", "dupline", "indent"]))
        at = draw(st.integers(0, len(text)))
        lines = text.splitlines(keepends=True) or [""]
        row = draw(st.integers(0, len(lines) - 1))
        if op == "truncate":
            text = text[:at]
        elif op == "insert":
            text = text[:at] + draw(st.sampled_from(INSERTS)) + text[at:]
        elif op == "delete":
            text = text[:at] + text[at + draw(st.integers(1, 40)) :]
        elif op == "tab":
            lines[row] = "\t" + lines[row].lstrip(" ")
            text = "".join(lines)
        elif op == "bom":
            text = "\ufeff" + text
        elif op == "crlf":
            text = text.replace("\n", "\r\n" if draw(st.booleans()) else "\r")
        elif op == "swap":
            other = draw(st.integers(0, len(lines) - 1))
            lines[row], lines[other] = lines[other], lines[row]
            text = "".join(lines)
        elif op == "dupline":
            lines.insert(row, lines[row])
            text = "".join(lines)
        elif op == "indent":
            lines[row] = " " * draw(st.integers(1, 3)) + lines[row]
            text = "".join(lines)
        done.append(f"{op} at {at}/{row}")
    data = text.encode("utf-8", "surrogatepass")
    encoding = draw(st.sampled_from(["utf-8"] * 6 + ["cp950", "latin-1", "utf-16", "bytes"]))
    if encoding == "bytes":
        at = draw(st.integers(0, len(data)))
        junk = draw(st.sampled_from([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\xe4\xb8", b"\x80\x80", b"\xfe\xff"]))
        data = data[:at] + junk + data[at:]
    elif encoding != "utf-8":
        data = text.encode(encoding, "replace")  # a spec saved as Big5 (cp950), Latin-1 or UTF-16
    done.append(encoding)
    return base, data, done


# --- the property: a plan, or located errors --------------------------------------------------------


def outcome(path: Path, data: bytes, state: Path) -> str:
    """Run the spec through what `twllm plan`/`deploy` run; return 'plan', 'spec-error' or
    'plan-error'. Any other exception fails the test with its traceback."""
    try:
        _, the_plan = build_plan(path, 8, state)
    except SpecError as error:
        assert_located(error, path, data)
        return "spec-error"
    except PlanError as error:
        # The spec is valid; the fleet (GPUs, ports) cannot hold it: not a problem of one field.
        assert error.message.strip()
        return "plan-error"
    assert isinstance(the_plan, Plan)
    json.dumps(the_plan.to_dict())
    return "plan"


def assert_located(error: SpecError, path: Path, data: bytes) -> None:
    assert error.exit_code == EXIT_INVALID
    assert error.issues, "a SpecError without issues"
    breaks = (b"\n", b"\r", "\x85".encode(), "\u2028".encode(), "\u2029".encode())
    last_line = sum(data.count(b) for b in breaks) + 1
    for issue in error.issues:
        assert issue.file == str(path), issue
        assert isinstance(issue.line, int) and 1 <= issue.line <= last_line, f"no usable line: {issue}"
        assert issue.message.strip(), issue
        text = str(issue)
        if issue.path:
            assert text.startswith(f"{path}:{issue.line} {issue.path}: "), text
        else:
            assert WHOLE_FILE.match(issue.message), f"a problem with no field path: {issue}"
            assert text.startswith(f"{path}:{issue.line}: "), text
        text.encode("utf-8")  # printable: no lone surrogate reaches the terminal
    str(error).encode("utf-8")


@pytest.fixture
def fuzz_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in ENV.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("UNSET_FUZZ_VAR", raising=False)


FUZZ = settings(
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example],
    print_blob=True,
)


def report(record_property: Any, name: str, counts: Counter) -> None:
    total = sum(counts.values())
    record_property(f"{name}_specs", total)
    print(f"\n{name}: {total} specs: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))


@pytest.mark.parametrize("base", sorted(BASES))
def test_the_bases_are_valid(base: str, fuzz_env: None, tmp_path: Path) -> None:
    """Each starting point plans, so what fails below fails because of its change."""
    path = tmp_path / "spec.yaml"
    for text in (BASES[base], to_yaml(BASE_DATA[base])):
        path.write_text(text, encoding="utf-8")
        assert outcome(path, text.encode(), tmp_path / "state") == "plan"


def test_mutated_specs_plan_or_name_file_line_and_field(fuzz_env: None, tmp_path: Path, record_property: Any) -> None:
    counts: Counter = Counter()
    path = tmp_path / "prod.yaml"

    @settings(FUZZ, max_examples=500)
    @given(mutated_specs())
    def check(case: tuple[str, bytes, list[str]]) -> None:
        base, data, done = case
        path.write_bytes(data)
        counts[outcome(path, data, tmp_path / "state")] += 1

    check()
    report(record_property, "mutated", counts)
    assert counts["plan"] and counts["spec-error"], counts


def test_damaged_files_plan_or_name_file_and_line(fuzz_env: None, tmp_path: Path, record_property: Any) -> None:
    counts: Counter = Counter()
    path = tmp_path / "prod.yaml"

    @settings(FUZZ, max_examples=600)
    @given(damaged_files())
    def check(case: tuple[str, bytes, list[str]]) -> None:
        base, data, done = case
        path.write_bytes(data)
        counts[outcome(path, data, tmp_path / "state")] += 1

    check()
    report(record_property, "damaged", counts)
    assert counts["spec-error"] > counts["plan"], counts


# --- the real command line ----------------------------------------------------------------------

_HEADER = re.compile(r"error: the spec is invalid \((\d+) problems?\)")


def assert_cli_answer(code: int, out: str, err: str, path: Path, expected: str) -> None:
    assert "Traceback" not in out + err and "internal error" not in err, err
    if expected == "plan":
        assert code == 0 and out.strip(), (code, out, err)
        return
    assert code == EXIT_INVALID, (code, err)
    if expected == "plan-error":
        assert err.startswith("error: "), err
        return
    header = _HEADER.search(err)
    assert header, err
    located = [line for line in err.splitlines() if line.startswith(f"  {path}:")]
    assert len(located) == int(header.group(1)), err
    for line in located:
        assert re.match(rf"  {re.escape(str(path))}:\d+(:| \S.*?:) ", line), line


def test_the_command_line_answers_with_located_errors(
    fuzz_env: None, tmp_path: Path, capsys: pytest.CaptureFixture[str], record_property: Any
) -> None:
    """`twllm validate` and `twllm plan`, in process, on 60 fuzzed files: exit 2 and one
    `file:line field: message` line per problem, or exit 0; never a traceback."""
    counts: Counter = Counter()
    path = tmp_path / "prod.yaml"
    state = tmp_path / "state"

    @settings(FUZZ, max_examples=60)
    @given(st.one_of(mutated_specs(), damaged_files()), st.sampled_from(["validate", "plan", "plan-json"]))
    def check(case: tuple[str, bytes, list[str]], command: str) -> None:
        path.write_bytes(case[1])
        expected = outcome(path, case[1], state)
        if command == "validate" and expected == "plan-error":
            expected = "plan"  # validate does not place models on GPUs
        args = ["validate", "-c", str(path)] if command == "validate" else ["plan", "-c", str(path), "--gpus", "8"]
        args += ["--state-dir", str(state)] if command != "validate" else []
        args += ["--json"] if command == "plan-json" else []
        capsys.readouterr()
        code = main(args)
        out, err = capsys.readouterr()
        assert_cli_answer(code, out, err, path, expected)
        counts[f"{command} {expected}"] += 1

    check()
    report(record_property, "cli", counts)


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"name: t\ngateway:\n  <<: {port: 4000}\n  master_key: x\n  port: \xff\n", id="non-utf8+merge"),
        pytest.param(b"name: " + b"[" * 3000 + b"]" * 3000 + b"\n", id="deep"),
    ],
)
def test_the_installed_entry_point_answers_with_located_errors(data: bytes, tmp_path: Path) -> None:
    """The real `python -m twllm` process: the same answer on stderr, nothing on stdout."""
    path = tmp_path / "spec.yaml"
    path.write_bytes(data)
    env = {**os.environ, **ENV}
    result = subprocess.run(
        [sys.executable, "-m", "twllm", "validate", "-c", str(path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        cwd=ROOT,
    )
    assert_cli_answer(result.returncode, result.stdout, result.stderr, path, "spec-error")
    assert result.stdout == ""


# --- a running deployment is never touched by a broken spec ---------------------------------------


def snapshot(root: Path) -> dict[str, tuple[int, int, str]]:
    """Every file and folder below ``root``: (mtime_ns, mode, sha256 of the content)."""
    seen = {}
    for item in sorted(root.rglob("*")):
        info = item.lstat()
        digest = hashlib.sha256(item.read_bytes()).hexdigest() if item.is_file() else "dir"
        seen[str(item.relative_to(root))] = (info.st_mtime_ns, info.st_mode, digest)
    info = root.lstat()
    seen["."] = (info.st_mtime_ns, info.st_mode, "dir")
    return seen


def prepared_state(root: Path) -> Path:
    """A state directory as a running deployment leaves it (contents are stand-ins)."""
    files = {
        "plan.json": '{"name": "twllm-prod"}',
        "state.json": '{"status": "ready", "components": []}',
        "rendered/litellm_config.yaml": "model_list: []\n",
        "rendered/gateway.json": "{}",
        "logs/gateway.log": "started\n",
        "secrets/engine_key": "engine-key-value\n",
        "spool/0001.jsonl": "",
        "supervisor.pid": "424242\n",
    }
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text, encoding="utf-8")
    for i, item in enumerate(sorted(root.rglob("*"), reverse=True)):
        os.utime(item, ns=(1_600_000_000_000_000_000 + i, 1_600_000_000_000_000_000 + i))
    os.utime(root, ns=(1_600_000_000_000_000_000, 1_600_000_000_000_000_000))
    return root


def test_deploy_with_a_broken_spec_changes_nothing(
    fuzz_env: None,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    record_property: Any,
) -> None:
    """`twllm deploy` validates and plans before it opens the state directory: with a broken
    spec it exits 2 naming file, line and field, and every file of the running deployment's
    state directory keeps its name, content, mode and mtime. The runtime step is replaced by
    one that fails the test, so no engine could start even if a spec got through."""

    def must_not_run(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("deploy went past validation with a broken spec")

    monkeypatch.setattr(runtime_cmds, "run_deploy", must_not_run)
    monkeypatch.setattr(runtime_cmds, "StateDir", must_not_run)
    state = prepared_state(tmp_path / "state")
    before = snapshot(state)
    counts: Counter = Counter()
    path = tmp_path / "specs" / "prod.yaml"
    path.parent.mkdir()

    @settings(FUZZ, max_examples=40)
    @given(st.one_of(mutated_specs(), damaged_files()), st.booleans())
    def check(case: tuple[str, bytes, list[str]], flag: bool) -> None:
        data = case[1]
        if not flag:
            # The spec names the state directory itself (first line, so a damaged tail keeps it).
            data = f"state_dir: {json.dumps(str(state))}\n".encode() + data
        path.write_bytes(data)
        expected = outcome(path, data, state)
        if expected == "plan":
            counts["valid, skipped"] += 1
            return
        args = ["deploy", "-c", str(path)] + (["--state-dir", str(state)] if flag else [])
        capsys.readouterr()
        code = main(args)
        out, err = capsys.readouterr()
        assert_cli_answer(code, out, err, path, expected)
        assert snapshot(state) == before, "a broken spec changed the state directory"
        counts[expected] += 1

    check()
    report(record_property, "deploy", counts)
    assert counts["spec-error"] >= 20, counts


# --- the bugs the fuzzing found, one minimal spec each -------------------------------------------

ONE_MODEL = """\
name: t
gateway:
  port: 4000
  master_key: ${TWLLM_MASTER_KEY}
models:
  - name: chat
    model: llama-3.1-8b-instruct
"""


def located(data: bytes | str, tmp_path: Path) -> list[tuple[int | None, str, str]]:
    path = tmp_path / "spec.yaml"
    path.write_bytes(data.encode("utf-8", "surrogatepass") if isinstance(data, str) else data)
    with pytest.raises(SpecError) as info:
        build_plan(path, 8, tmp_path / "state")
    assert_located(info.value, path, path.read_bytes())
    return [(i.line, i.path, i.message) for i in info.value.issues]


def test_merge_keys_are_read_with_the_lines_of_the_merged_fields(fuzz_env: None, tmp_path: Path) -> None:
    """Was KeyError (an internal error): a key brought in by `<<` has no line of its own."""
    path = tmp_path / "spec.yaml"
    path.write_text(ONE_MODEL.replace("  port: 4000\n", "  <<: {port: 4001}\n"), encoding="utf-8")
    loaded, _ = build_plan(path, 8, tmp_path / "state")
    assert loaded.spec.gateway.port == 4001
    assert loaded.source.lines[("gateway", "port")] == 3
    text = "base: &b {port: 70000}\n" + ONE_MODEL.replace("  port: 4000\n", "  <<: *b\n")
    assert (1, "gateway.port") in [(line, field) for line, field, _ in located(text, tmp_path)]


@pytest.mark.parametrize(
    "text",
    [
        pytest.param("name: " + "[" * 3000 + "]" * 3000 + "\n", id="flow"),
        pytest.param("".join("  " * i + "a:\n" for i in range(400)) + "  " * 400 + "b: 1\n", id="block"),
        pytest.param(ONE_MODEL + "    engine_args: {a: " + "[" * 80 + "]" * 80 + "}\n", id="in-a-field"),
    ],
)
def test_deep_nesting_is_an_error_at_its_line(text: str, fuzz_env: None, tmp_path: Path) -> None:
    """Was RecursionError."""
    issues = located(text, tmp_path)
    assert any("nests too deep" in message for _, _, message in issues), issues


def test_numbers_too_long_for_python_are_errors_at_their_line(fuzz_env: None, tmp_path: Path) -> None:
    """Was ValueError ("Exceeds the limit (4300 digits) for integer string conversion"), in the
    YAML reader for decimal digits and when printing or planning a long hexadecimal number."""
    assert located(ONE_MODEL.replace("4000", "9" * 5000), tmp_path)[0][:2] == (3, "")
    assert located(ONE_MODEL.replace("4000", "0x" + "f" * 4000), tmp_path)[0][:2] == (3, "gateway.port")
    engine_arg = ONE_MODEL + "    engine_args: {max-num-seqs: 0x" + "f" * 4000 + "}\n"
    assert located(engine_arg, tmp_path)[0][:2] == (8, "models[0].engine_args.max-num-seqs")


def test_a_date_that_does_not_exist_is_an_error_at_its_line(fuzz_env: None, tmp_path: Path) -> None:
    """Was ValueError ("month must be in 1..12") from the YAML reader."""
    issues = located(ONE_MODEL + "    system_prompt: 2024-13-45\n", tmp_path)
    assert issues[0][:2] == (8, "") and "2024-13-45" in issues[0][2]


def test_control_characters_are_errors_at_their_line(fuzz_env: None, tmp_path: Path) -> None:
    """Was an error with no line: `spec.yaml: YAML syntax error: unacceptable character`."""
    issues = located(ONE_MODEL.replace("name: chat", "name: ch\x01at"), tmp_path)
    assert issues[0][:2] == (6, "") and "#x0001" in issues[0][2]


def test_a_file_that_is_not_utf8_is_an_error_at_its_line(fuzz_env: None, tmp_path: Path) -> None:
    """Was an error with no line; a spec saved as Big5 (cp950) is the likely case."""
    text = ONE_MODEL + "    system_prompt: 請使用臺灣繁體中文回答。\n"
    issues = located(text.encode("cp950"), tmp_path)
    assert issues[0][:2] == (8, "") and "not UTF-8" in issues[0][2]


MODEL_LINE = "    model: llama-3.1-8b-instruct\n"


@pytest.mark.parametrize(
    ("text", "field"),
    [
        (ONE_MODEL.replace(MODEL_LINE, '    source: {path: "/models/a\\0b"}\n'), "models[0].source.path"),
        (ONE_MODEL.replace(MODEL_LINE, "    source: {gguf: ~nosuchuser-twllm-fuzz/m.gguf}\n"), "models[0].source.gguf"),
        (ONE_MODEL + 'state_dir: "~nosuchuser-twllm-fuzz/state"\n', "state_dir"),
        (ONE_MODEL + 'state_dir: "/srv/a\\0b"\n', "state_dir"),
        (ONE_MODEL + "engines: {vllm_python: ~nosuchuser-twllm-fuzz/bin/python}\n", "engines.vllm_python"),
        (ONE_MODEL.replace("  port: 4000\n", '  tls: {cert: "/a\\0b", key: k}\n'), "gateway.tls.cert"),
        (ONE_MODEL.replace("  port: 4000\n", "  tls: {cert: c, key: ~nosuchuser-twllm-fuzz/k}\n"), "gateway.tls.key"),
        (
            ONE_MODEL + "guard: {input: [llama_guard], llama_guard: {model: ~nosuchuser-twllm-fuzz/lg}}\n",
            "guard.llama_guard.model",
        ),
    ],
)
def test_paths_that_cannot_be_used_are_errors_at_their_field(
    text: str, field: str, fuzz_env: None, tmp_path: Path
) -> None:
    """Were ValueError ("embedded null byte") and RuntimeError ("Could not determine home
    directory") from the spec stage, the plan, or deploy's state directory."""
    issues = located(text, tmp_path)
    assert [p for _, p, _ in issues] == [field], issues


def test_lone_surrogates_are_errors_at_their_field(fuzz_env: None, tmp_path: Path) -> None:
    """Was `spec.yaml:1: Input should be a valid string` with no field: a "\\ud800" escape in a key."""
    issues = located(ONE_MODEL + '    "max\\ud800": 1\n', tmp_path)
    assert [(line, p) for line, p, _ in issues] == [(8, "models[0].max\\ud800")]
    issues = located(ONE_MODEL + '    system_prompt: "\\udfff"\n', tmp_path)
    assert [(line, p) for line, p, _ in issues] == [(8, "models[0].system_prompt")]
    # A pair, as JSON writes a character beyond U+FFFF, is that character.
    path = tmp_path / "pair.yaml"
    path.write_text(ONE_MODEL + '    system_prompt: "\\ud83d\\ude00"\n', encoding="utf-8")
    loaded, _ = build_plan(path, 8, tmp_path / "state")
    assert loaded.spec.models[0].system_prompt == "😀"


def test_aliases_of_aliases_cannot_make_the_spec_explode(fuzz_env: None, tmp_path: Path) -> None:
    """Was exponential time: nine levels of ten aliases each expand to 10**9 values."""
    laughs = "".join(f"l{i}: &l{i} [" + ", ".join([f"*l{i - 1}" if i else "x"] * 10) + "]\n" for i in range(9))
    issues = located(ONE_MODEL + laughs, tmp_path)
    assert any("more than 100000 values" in message for _, _, message in issues), issues


def test_a_long_value_is_quoted_short(fuzz_env: None, tmp_path: Path) -> None:
    """Was the whole value in the message: 100 000 characters of a pasted file on the terminal."""
    issues = located(ONE_MODEL.replace("4000", "x" * 100_000), tmp_path)
    assert issues[0][:2] == (3, "gateway.port") and len(issues[0][2]) < 200, issues[0][2][:300]
    assert "(100002 characters)" in issues[0][2]
