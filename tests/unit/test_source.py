"""The YAML reader: plain data, the line of every field, and ${VAR} interpolation."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from twllm.errors import SpecError
from twllm.spec.source import EnvStr, format_path, load_source, parse_source


def y(text: str) -> str:
    return textwrap.dedent(text).lstrip("\n")


NESTED = y("""
    name: t
    gateway:
      port: 4000
      fallbacks:
        a: [b, c]
    models:
      - name: a
        engine_args:
          x: 1
        tags:
          - one
          - [deep, er]
      - {name: b, fallbacks: [a]}
    guard:
      input:
        - pii
""")


def test_line_map_for_nested_maps_and_lists() -> None:
    src = parse_source(NESTED, "n.yaml", {})
    expected = {
        (): 1,
        ("name",): 1,
        ("gateway",): 2,
        ("gateway", "port"): 3,
        ("gateway", "fallbacks"): 4,
        ("gateway", "fallbacks", "a"): 5,
        ("gateway", "fallbacks", "a", 0): 5,
        ("gateway", "fallbacks", "a", 1): 5,
        ("models",): 6,
        ("models", 0): 7,
        ("models", 0, "name"): 7,
        ("models", 0, "engine_args"): 8,
        ("models", 0, "engine_args", "x"): 9,
        ("models", 0, "tags"): 10,
        ("models", 0, "tags", 0): 11,
        ("models", 0, "tags", 1): 12,
        ("models", 0, "tags", 1, 0): 12,
        ("models", 0, "tags", 1, 1): 12,
        ("models", 1): 13,
        ("models", 1, "name"): 13,
        ("models", 1, "fallbacks"): 13,
        ("models", 1, "fallbacks", 0): 13,
        ("guard",): 14,
        ("guard", "input"): 15,
        ("guard", "input", 0): 16,
    }
    assert src.lines == expected


def test_data_is_plain_python() -> None:
    src = parse_source(NESTED, "n.yaml", {})
    assert src.data == {
        "name": "t",
        "gateway": {"port": 4000, "fallbacks": {"a": ["b", "c"]}},
        "models": [
            {"name": "a", "engine_args": {"x": 1}, "tags": ["one", ["deep", "er"]]},
            {"name": "b", "fallbacks": ["a"]},
        ],
        "guard": {"input": ["pii"]},
    }
    assert type(src.data) is dict
    assert type(src.data["models"]) is list
    assert type(src.data["models"][1]) is dict
    assert type(src.data["gateway"]["fallbacks"]["a"]) is list
    assert type(src.data["name"]) is str


def test_line_of_falls_back_to_the_nearest_ancestor() -> None:
    src = parse_source(NESTED, "n.yaml", {})
    assert src.line_of(("models", 0, "engine_args", "x")) == 9
    assert src.line_of(("models", 0, "missing_field")) == 7
    assert src.line_of(("models", 1, "price", "currency")) == 13
    assert src.line_of(("nowhere", "at", "all")) == 1


def test_format_path() -> None:
    assert format_path(("models", 2, "gpus")) == "models[2].gpus"
    assert format_path(("gateway", "fallbacks", "a", 0)) == "gateway.fallbacks.a[0]"
    assert format_path((0, "x")) == "[0].x"
    assert format_path(()) == ""


def test_scalars_become_plain_python_types() -> None:
    src = parse_source(
        y("""
        an_int: 42
        a_hex: 0x10
        a_float: 0.5
        an_exp: 1.0e3
        true_: true
        false_: false
        nothing: null
        tilde: ~
        yes_is_text: yes
        quoted_int: "42"
    """),
        "s.yaml",
        {},
    )
    d = src.data
    assert (type(d["an_int"]), d["an_int"]) == (int, 42)
    assert (type(d["a_hex"]), d["a_hex"]) == (int, 16)
    assert (type(d["a_float"]), d["a_float"]) == (float, 0.5)
    assert (type(d["an_exp"]), d["an_exp"]) == (float, 1000.0)
    assert d["true_"] is True
    assert d["false_"] is False
    assert d["nothing"] is None and d["tilde"] is None
    assert (type(d["yes_is_text"]), d["yes_is_text"]) == (str, "yes")  # YAML 1.2: no Norway problem
    assert (type(d["quoted_int"]), d["quoted_int"]) == (str, "42")


def test_anchored_booleans_stay_booleans() -> None:
    src = parse_source("a: &t true\nb: *t\n", "s.yaml", {})
    assert src.data["a"] is True and src.data["b"] is True


def test_dollar_dollar_escapes_a_dollar() -> None:
    src = parse_source(
        y("""
        price: "$$5"
        literal_ref: "$${NOT_EXPANDED}"
        mixed: "a$$b-${V}"
    """),
        "s.yaml",
        {"V": "v"},
    )
    assert src.data == {"price": "$5", "literal_ref": "${NOT_EXPANDED}", "mixed": "a$b-v"}
    assert not isinstance(src.data["literal_ref"], EnvStr)
    assert src.env_refs == {}


def test_whole_scalar_reference_remembers_its_variable() -> None:
    src = parse_source(
        y("""
        gateway:
          master_key: ${KEY}
        database:
          url: ${DB:-postgresql://localhost/x}
        models:
          - name: ${NAME}
    """),
        "s.yaml",
        {"KEY": "sk-1", "NAME": "m"},
    )
    key = src.data["gateway"]["master_key"]
    assert isinstance(key, EnvStr) and key == "sk-1" and key.var == "KEY"
    url = src.data["database"]["url"]
    assert isinstance(url, EnvStr) and url == "postgresql://localhost/x" and url.var == "DB"
    assert src.data["models"][0]["name"].var == "NAME"
    assert src.env_refs == {
        ("gateway", "master_key"): "KEY",
        ("database", "url"): "DB",
        ("models", 0, "name"): "NAME",
    }


def test_partial_reference_is_plain_text() -> None:
    src = parse_source('a: "sk-${KEY}"\nb: "${X}${Y}"\n', "s.yaml", {"KEY": "1", "X": "x", "Y": "y"})
    assert src.data == {"a": "sk-1", "b": "xy"}
    assert type(src.data["a"]) is str and type(src.data["b"]) is str
    assert src.env_refs == {}


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, "fallback"),
        ({"V": ""}, "fallback"),
        ({"V": "set"}, "set"),
    ],
    ids=["unset", "empty", "set"],
)
def test_default_used_when_variable_unset_or_empty(env: dict[str, str], expected: str) -> None:
    src = parse_source("a: ${V:-fallback}\nb: x-${V:-fallback}-y\n", "s.yaml", env)
    assert src.data == {"a": expected, "b": f"x-{expected}-y"}


def test_default_may_hold_colons_slashes_and_be_empty() -> None:
    src = parse_source('a: "${V:-~/.cache/m:1}"\nb: "${V:-}"\n', "s.yaml", {})
    assert src.data == {"a": "~/.cache/m:1", "b": ""}


def test_empty_variable_without_default_is_empty_text() -> None:
    src = parse_source("a: ${V}\n", "s.yaml", {"V": ""})
    assert src.data == {"a": ""}
    assert src.data["a"].var == "V"


def test_unset_variables_are_all_reported_with_line_and_path() -> None:
    text = y("""
        name: t
        models:
          - name: m
            source: {path: "${MODELS}/m"}
          - name: ${SECOND}
    """)
    with pytest.raises(SpecError) as info:
        parse_source(text, "s.yaml", {})
    got = [(i.file, i.line, i.path) for i in info.value.issues]
    assert got == [("s.yaml", 4, "models[0].source.path"), ("s.yaml", 5, "models[1].name")]
    assert "environment variable MODELS is not set" in info.value.issues[0].message
    assert "${SECOND:-default}" in info.value.issues[1].message


def test_references_are_not_expanded_in_keys_or_non_text() -> None:
    src = parse_source("${K}: 1\nn: 5\n", "s.yaml", {"K": "expanded"})
    assert src.data == {"${K}": 1, "n": 5}


def test_load_source_reads_a_file(tmp_path: Path) -> None:
    path = tmp_path / "s.yaml"
    path.write_text("name: ${N}\n", encoding="utf-8")
    src = load_source(path, {"N": "t"})
    assert src.file == str(path)
    assert src.data == {"name": "t"}


def test_load_source_unreadable(tmp_path: Path) -> None:
    bad = tmp_path / "latin1.yaml"
    bad.write_bytes("name: caf\xe9\n".encode("latin-1"))
    with pytest.raises(SpecError) as info:
        load_source(bad, {})
    (issue,) = info.value.issues
    assert issue.file == str(bad) and "cannot read file" in issue.message
    with pytest.raises(SpecError) as info:
        load_source(tmp_path, {})
    assert "cannot read file" in info.value.issues[0].message
