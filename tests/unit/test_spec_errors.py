"""Every invalid spec is reported with the file, the 1-based line and the field path.

Each malformed spec below is a small variation of a minimal valid one; the comments on the
left of each YAML text are not part of it — line numbers are counted in the text itself.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from twllm.errors import EXIT_INVALID, SpecError, SpecIssue
from twllm.spec.resolve import load_spec, parse_spec

FILE = "spec.yaml"


def y(text: str) -> str:
    """Dedent a YAML text and drop the first newline, so that line 1 is the first line written."""
    return textwrap.dedent(text).lstrip("\n")


# line 1..7: one vLLM chat model.
ONE_MODEL = y("""
    name: t
    gateway:
      port: 4000
      master_key: ${TWLLM_MASTER_KEY}
    models:
      - name: chat
        model: llama-3.1-8b-instruct
""")

# line 1..10: a vLLM chat model (models[0]) and an Ollama model (models[1]).
TWO_MODELS = ONE_MODEL + ("  - name: small\n    model: phi-4-mini-instruct\n    engine: ollama\n")

EXTRA_ENV = {"PLAIN_KEY": "not-an-sk-key", "EMPTY_VAR": ""}


@pytest.fixture
def env(spec_env: dict[str, str]) -> dict[str, str]:
    return {**spec_env, **EXTRA_ENV}


def issues_of(text: str, env: dict[str, str]) -> list[SpecIssue]:
    with pytest.raises(SpecError) as info:
        parse_spec(text, FILE, env)
    assert info.value.exit_code == EXIT_INVALID
    assert info.value.issues, "a SpecError must carry at least one issue"
    return info.value.issues


def describe(issues: list[SpecIssue]) -> str:
    return "\n".join(f"  line={i.line} path={i.path!r} message={i.message!r}" for i in issues)


@pytest.mark.parametrize("text", [ONE_MODEL, TWO_MODELS], ids=["one-model", "two-models"])
def test_base_specs_are_valid(text: str, env: dict[str, str]) -> None:
    """The starting points are valid, so each failure below comes from its one change."""
    loaded = parse_spec(text, FILE, env)
    assert loaded.spec.gateway.master_key.reveal() == "sk-test-master"


CASES = [
    # --- YAML itself --------------------------------------------------------------------------
    pytest.param(
        y("""
        name: t
        gateway:
          master_key: ${TWLLM_MASTER_KEY}
           port: 4000
        """),
        4,
        "",
        "YAML syntax error",
        id="yaml-syntax-error",
    ),
    pytest.param(
        y("""
        name: t
        gateway:
          port: 4000
          port: 4001
          master_key: ${TWLLM_MASTER_KEY}
        models:
          - {name: chat, model: llama-3.1-8b-instruct}
        """),
        4,
        "",
        'duplicate key "port"',
        id="yaml-duplicate-key",
    ),
    pytest.param(
        y("""
        - name: t
        - models: []
        """),
        1,
        "",
        "top level must be a mapping",
        id="top-level-list",
    ),
    pytest.param("", 1, "", "the file is empty", id="empty-file"),
    pytest.param("# only a comment\n\n", 1, "", "the file is empty", id="comments-only-file"),
    pytest.param(ONE_MODEL + "1: one\n", 8, "1", "keys must be text", id="non-text-key"),
    # --- unknown fields -----------------------------------------------------------------------
    pytest.param(
        ONE_MODEL.replace("gateway:", "gatway:"),
        2,
        "gatway",
        "unknown field 'gatway' (did you mean 'gateway'?)",
        id="unknown-top-level-key",
    ),
    pytest.param(
        ONE_MODEL + "    replica: 2\n",
        8,
        "models[0].replica",
        "unknown field 'replica' (did you mean 'replicas'?)",
        id="unknown-model-key",
    ),
    pytest.param(
        ONE_MODEL + "    price: {input_per_1m: 1.0, currecny: USD}\n",
        8,
        "models[0].price.currecny",
        "did you mean 'currency'?",
        id="unknown-key-in-flow-mapping",
    ),
    pytest.param(
        ONE_MODEL + "guard:\n  llama_guard:\n    modle: llama-guard-3-1b\n",
        10,
        "guard.llama_guard.modle",
        "did you mean 'model'?",
        id="unknown-deep-key",
    ),
    # --- shape and bounds ---------------------------------------------------------------------
    pytest.param(
        ONE_MODEL + "  - name: two\n    model: llama-3.1-8b-instruct\n    gpus: 0\n",
        10,
        "models[1].gpus",
        "must be ≥ 1",
        id="gpus-zero",
    ),
    pytest.param(
        ONE_MODEL.replace("port: 4000", "port: 70000"),
        3,
        "gateway.port",
        "must be ≤ 65535, got 70000",
        id="port-out-of-range",
    ),
    pytest.param(
        ONE_MODEL.replace("port: 4000", "workers: many"),
        3,
        "gateway.workers",
        "must be a whole number, got 'many'",
        id="wrong-type",
    ),
    pytest.param(
        TWO_MODELS.replace("engine: ollama", "engine: tgi"),
        10,
        "models[1].engine",
        "must be one of 'vllm' or 'ollama', got 'tgi'",
        id="literal-error",
    ),
    pytest.param(
        ONE_MODEL + "  - name: 'two words'\n    model: phi-4\n",
        8,
        "models[1].name",
        "does not have the expected form",
        id="bad-model-name",
    ),
    pytest.param(
        y("""
        name: t
        gateway:
          master_key: ${TWLLM_MASTER_KEY}
        """),
        1,
        "models",
        "required field is missing",
        id="missing-models",
    ),
    pytest.param(
        y("""
        name: t
        gateway:
          master_key: ${TWLLM_MASTER_KEY}
        models: []
        """),
        4,
        "models",
        "needs at least 1 item",
        id="empty-models",
    ),
    pytest.param(ONE_MODEL.replace("name: t\n", "", 1), 1, "name", "required field is missing", id="missing-name"),
    pytest.param(
        ONE_MODEL.replace("  master_key: ${TWLLM_MASTER_KEY}\n", ""),
        2,
        "gateway.master_key",
        "required field is missing",
        id="missing-master-key",
    ),
    pytest.param(
        ONE_MODEL.replace("    model: llama-3.1-8b-instruct\n", "    task: chat\n"),
        6,
        "models[0]",
        "give `model` (a registry id) or `source`",
        id="model-without-weights",
    ),
    # --- environment variables and secrets ----------------------------------------------------
    pytest.param(
        ONE_MODEL.replace("${TWLLM_MASTER_KEY}", "${NOPE}"),
        4,
        "gateway.master_key",
        "environment variable NOPE is not set",
        id="unset-env-var",
    ),
    pytest.param(
        ONE_MODEL.replace("${TWLLM_MASTER_KEY}", "${EMPTY_VAR}"),
        4,
        "gateway.master_key",
        "environment variable EMPTY_VAR is empty",
        id="empty-env-var",
    ),
    pytest.param(
        ONE_MODEL.replace("${TWLLM_MASTER_KEY}", "sk-written-in-the-file"),
        4,
        "gateway.master_key",
        "secrets are never written in the spec file",
        id="literal-master-key",
    ),
    pytest.param(
        ONE_MODEL.replace("${TWLLM_MASTER_KEY}", "sk-${TWLLM_MASTER_KEY}"),
        4,
        "gateway.master_key",
        "secrets are never written in the spec file",
        id="master-key-partly-interpolated",
    ),
    pytest.param(
        ONE_MODEL.replace("${TWLLM_MASTER_KEY}", "${PLAIN_KEY}"),
        4,
        "gateway.master_key",
        "the value of PLAIN_KEY must start with 'sk-'",
        id="master-key-without-sk-prefix",
    ),
    pytest.param(
        ONE_MODEL.replace("${TWLLM_MASTER_KEY}", "${NOPE:-sk-written-in-the-file}"),
        4,
        "gateway.master_key",
        "a secret cannot have a default in the spec file",
        id="secret-with-default",
    ),
    pytest.param(
        ONE_MODEL + "database:\n  url: postgresql://twllm:hunter2@db:5432/twllm\n",
        9,
        "database.url",
        "this URL holds a password",
        id="database-url-with-password",
    ),
    pytest.param(
        ONE_MODEL + "database:\n  url: mysql://db/twllm\n",
        9,
        "database.url",
        "must be a postgresql:// URL",
        id="database-url-not-postgres",
    ),
    # --- rules inside one model ---------------------------------------------------------------
    pytest.param(
        TWO_MODELS + "    tensor_parallel: 2\n",
        11,
        "models[1].tensor_parallel",
        "not available with engine: ollama",
        id="tensor-parallel-on-ollama",
    ),
    pytest.param(
        TWO_MODELS + "    replicas: 2\n",
        11,
        "models[1].replicas",
        "ollama serves each model once",
        id="replicas-on-ollama",
    ),
    pytest.param(
        ONE_MODEL + "    gpus: 2\n    tensor_parallel: 4\n",
        8,
        "models[0].gpus",
        "2 does not equal tensor_parallel × pipeline_parallel = 4",
        id="gpus-not-tp-times-pp",
    ),
    pytest.param(
        ONE_MODEL + "    device: cpu\n    tensor_parallel: 2\n",
        9,
        "models[0].tensor_parallel",
        "not available with device: cpu",
        id="tensor-parallel-on-cpu",
    ),
    pytest.param(
        ONE_MODEL.replace(
            "    model: llama-3.1-8b-instruct\n", "    source:\n      hf: org/repo\n      path: /models/x\n"
        ),
        7,
        "models[0].source",
        "give exactly one of hf, path, gguf, ollama (got hf, path)",
        id="source-with-two-kinds",
    ),
    pytest.param(
        ONE_MODEL + "    fallbacks: [chat]\n",
        8,
        "models[0].fallbacks",
        "cannot fall back to itself",
        id="fallback-to-itself",
    ),
    # --- rules against the registry and across models -----------------------------------------
    pytest.param(
        TWO_MODELS.replace("name: small", "name: chat"),
        8,
        "models[1].name",
        "duplicate model name 'chat' (first at models[0])",
        id="duplicate-model-names",
    ),
    pytest.param(
        ONE_MODEL + "    task: embed\n",
        8,
        "models[0].task",
        "'llama-3.1-8b-instruct' is a chat model; it cannot serve embeddings",
        id="embed-task-on-chat-model",
    ),
    pytest.param(
        ONE_MODEL.replace("llama-3.1-8b-instruct", "bge-m3") + "    task: chat\n",
        8,
        "models[0].task",
        "is an embedding model; set task: embed",
        id="chat-task-on-embedding-model",
    ),
    pytest.param(
        ONE_MODEL.replace("llama-3.1-8b-instruct", "llama-3.1-8b-instrct"),
        7,
        "models[0].model",
        "unknown model 'llama-3.1-8b-instrct' (did you mean 'llama-3.1-8b-instruct'?)",
        id="unknown-registry-id",
    ),
    pytest.param(
        ONE_MODEL.replace("llama-3.1-8b-instruct", "llama-prompt-guard-2-86m"),
        7,
        "models[0].model",
        "is a classifier run inside the gateway",
        id="classifier-in-models",
    ),
    pytest.param(
        TWO_MODELS.replace("phi-4-mini-instruct", "llama-3.1-taide-lx-8b-chat"),
        9,
        "models[1].model",
        "has no Ollama tag",
        id="ollama-without-tag",
    ),
    pytest.param(
        TWO_MODELS.replace(
            "    model: llama-3.1-8b-instruct\n", "    model: llama-3.1-8b-instruct\n    fallbacks: [smal]\n"
        ),
        8,
        "models[0].fallbacks[0]",
        "no model named 'smal' (did you mean 'small'?)",
        id="fallback-to-unknown-model",
    ),
    pytest.param(
        ONE_MODEL.replace("  port: 4000\n", "  port: 4000\n  fallbacks:\n    chat: [chta]\n"),
        5,
        "gateway.fallbacks.chat[0]",
        "no model named 'chta' (did you mean 'chat'?)",
        id="gateway-fallback-to-unknown-model",
    ),
    pytest.param(
        ONE_MODEL + "    engine_args:\n      max-model-len: 4096\n",
        9,
        "models[0].engine_args.max-model-len",
        "use the field `max_model_len` instead",
        id="reserved-engine-arg",
    ),
    pytest.param(
        TWO_MODELS + "    engine_args: {enforce-eager: true}\n",
        11,
        "models[1].engine_args.enforce-eager",
        "engine_args are vLLM flags",
        id="engine-args-on-ollama",
    ),
    pytest.param(
        ONE_MODEL + "    max_model_len: 1000000\n",
        8,
        "models[0].max_model_len",
        "1000000 exceeds the context length of 'llama-3.1-8b-instruct' (131072)",
        id="max-model-len-above-registry",
    ),
    # --- guard --------------------------------------------------------------------------------
    pytest.param(
        ONE_MODEL + "guard:\n  input: [pii, piii]\n",
        9,
        "guard.input[1]",
        "got 'piii' (did you mean 'pii'?)",
        id="unknown-guard-stage",
    ),
    pytest.param(
        ONE_MODEL + "guard:\n  output: [prompt_guard]\n",
        9,
        "guard.output",
        "prompt_guard screens input only",
        id="prompt-guard-in-output",
    ),
    pytest.param(
        ONE_MODEL + "guard:\n  input: [zh_tw]\n", 9, "guard.input", "zh_tw normalises output only", id="zh-tw-in-input"
    ),
    pytest.param(
        ONE_MODEL + "guard:\n  input: [llama_guard]\n  llama_guard: {model: llama-guard-3-1c}\n",
        10,
        "guard.llama_guard.model",
        "did you mean 'llama-guard-3-1b'?",
        id="unknown-guard-model",
    ),
    pytest.param(
        ONE_MODEL + "guard:\n  llama_guard:\n    excluded_categories: [S1, S15]\n",
        10,
        "guard.llama_guard.excluded_categories[1]",
        "'S15' does not have the expected form",
        id="guard-category-out-of-range",
    ),
]


@pytest.mark.parametrize(("text", "line", "path", "fragment"), CASES)
def test_invalid_spec_is_located(text: str, line: int, path: str, fragment: str, env: dict[str, str]) -> None:
    issues = issues_of(text, env)
    assert all(i.file == FILE for i in issues)
    matching = [i for i in issues if i.line == line and i.path == path and fragment in i.message]
    assert matching, f"no issue at line {line} path {path!r} containing {fragment!r}; got:\n{describe(issues)}"


def test_cases_are_distinct() -> None:
    texts = [case.values[0] for case in CASES]
    assert len(set(texts)) == len(texts) >= 20


def test_unknown_top_level_key_also_reports_the_missing_field(env: dict[str, str]) -> None:
    issues = issues_of(ONE_MODEL.replace("gateway:", "gatway:"), env)
    assert [(i.line, i.path) for i in issues] == [(1, "gateway"), (2, "gatway")]


def test_unknown_key_without_close_match_lists_the_allowed_fields(env: dict[str, str]) -> None:
    issues = issues_of(ONE_MODEL + "    zzzzzz: 1\n", env)
    assert len(issues) == 1
    assert issues[0].path == "models[0].zzzzzz"
    assert "did you mean" not in issues[0].message
    assert "allowed: " in issues[0].message and "replicas" in issues[0].message


def test_password_never_appears_in_the_error(env: dict[str, str]) -> None:
    with pytest.raises(SpecError) as info:
        parse_spec(ONE_MODEL + "database:\n  url: postgresql://twllm:hunter2@db:5432/twllm\n", FILE, env)
    assert "hunter2" not in str(info.value)


def test_env_default_is_used_when_the_variable_is_unset_or_empty(env: dict[str, str]) -> None:
    assert "port: 4000" in ONE_MODEL
    for var in ("NOPE", "EMPTY_VAR"):
        loaded = parse_spec(ONE_MODEL.replace("port: 4000", "port: ${%s:-4100}" % var), FILE, {**env, "EMPTY_VAR": ""})
        assert loaded.spec.gateway.port == 4100
    loaded = parse_spec(ONE_MODEL.replace("port: 4000", "port: ${GW_PORT:-4100}"), FILE, {**env, "GW_PORT": "4200"})
    assert loaded.spec.gateway.port == 4200
    assert loaded.spec.gateway.master_key.var == "TWLLM_MASTER_KEY"


def test_every_shape_problem_is_reported_sorted_by_line(env: dict[str, str]) -> None:
    text = y("""
        name: t
        gateway:
          wrokers: 2
          port: 0
          master_key: ${TWLLM_MASTER_KEY}
        models:
          - name: chat
            model: llama-3.1-8b-instruct
            gpus: 0
          - name: small
            model: phi-4-mini-instruct
            engine: tgi
        """)
    issues = issues_of(text, env)
    assert [(i.line, i.path) for i in issues] == [
        (3, "gateway.wrokers"),
        (4, "gateway.port"),
        (9, "models[0].gpus"),
        (12, "models[1].engine"),
    ]
    assert "did you mean 'workers'?" in issues[0].message


def test_every_registry_problem_is_reported_sorted_by_line(env: dict[str, str]) -> None:
    text = y("""
        name: t
        gateway:
          master_key: ${TWLLM_MASTER_KEY}
          fallbacks:
            chat: [nobody]
        models:
          - name: chat
            model: llama-3.1-8b-instrct
          - name: chat
            model: llama-3.1-8b-instruct
            max_model_len: 1000000
        """)
    issues = issues_of(text, env)
    assert [(i.line, i.path) for i in issues] == [
        (5, "gateway.fallbacks.chat[0]"),
        (8, "models[0].model"),
        (9, "models[1].name"),
        (11, "models[1].max_model_len"),
    ]


def test_every_unset_variable_is_reported(env: dict[str, str]) -> None:
    text = ONE_MODEL.replace("${TWLLM_MASTER_KEY}", "${NOPE_ONE}") + "database:\n  url: ${NOPE_TWO}\n"
    issues = issues_of(text, env)
    assert [(i.line, i.path) for i in issues] == [(4, "gateway.master_key"), (9, "database.url")]
    assert "NOPE_ONE" in issues[0].message and "NOPE_TWO" in issues[1].message


def test_issue_reads_file_line_path_message(
    write_spec, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, env: dict[str, str]
) -> None:
    text = y("""
        name: t
        gateway:
          master_key: ${TWLLM_MASTER_KEY}
        models:
          - name: one
            model: llama-3.1-8b-instruct
          - name: two
            model: llama-3.2-1b-instruct
          - name: three
            model: llama-3.2-3b-instruct
            replicas: 1
            max_model_len: 4096
            dtype: bfloat16
            gpus: 0
        """)
    write_spec(text, "prod.yaml")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SpecError) as info:
        load_spec(Path("prod.yaml"), env)
    (issue,) = info.value.issues
    assert str(issue) == "prod.yaml:14 models[2].gpus: must be ≥ 1, got 0"
    assert str(info.value) == str(issue)


def test_issue_text_without_line_or_path() -> None:
    assert str(SpecIssue("a.yaml", None, "", "file not found")) == "a.yaml: file not found"
    assert str(SpecIssue("a.yaml", 3, "", "YAML syntax error: x")) == "a.yaml:3: YAML syntax error: x"
    assert str(SpecIssue("a.yaml", None, "models", "m")) == "a.yaml models: m"


def test_missing_file(tmp_path: Path, env: dict[str, str]) -> None:
    path = tmp_path / "absent.yaml"
    with pytest.raises(SpecError) as info:
        load_spec(path, env)
    assert [(i.file, i.line, i.message) for i in info.value.issues] == [(str(path), None, "file not found")]
