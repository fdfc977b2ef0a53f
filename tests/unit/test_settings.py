"""twllm/settings.py is the one table of environment variables: every name is spelled there, once,
with its meaning, and every other module imports the constant."""

from __future__ import annotations

import ast
import os
import re
from pathlib import Path

import twllm
from twllm import settings
from twllm.settings import TABLE, VARIABLES, Settings

PACKAGE = Path(twllm.__file__).parent
SETTINGS_FILE = PACKAGE / "settings.py"
NAME = re.compile(r"TWLLM_[A-Z_]+")


def _docstrings(tree: ast.AST) -> set[int]:
    """ids of the string constants that are bare statements: docstrings (module, class, function,
    attribute), which are prose for readers, never a name the code uses."""
    return {
        id(node.value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str)
    }


def spelled_outside_settings() -> list[str]:
    """``file:line: literal`` for every string literal (f-string parts too) in twllm/ but outside
    settings.py that spells a TWLLM_* name."""
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path == SETTINGS_FILE:
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        prose = _docstrings(tree)
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in prose:
                if NAME.search(node.value):
                    found.append(f"{os.path.relpath(path, PACKAGE.parent)}:{node.lineno}: {node.value!r}")
    return found


def test_no_variable_name_is_spelled_outside_settings() -> None:
    found = spelled_outside_settings()
    assert found == [], "import the constant from twllm.settings instead:\n" + "\n".join(found)


def test_the_scan_sees_literals_and_f_strings_but_not_docstrings(tmp_path: Path) -> None:
    source = '"""Mentions TWLLM_DOC."""\nA = "TWLLM_PLAIN"\nB = f"set TWLLM_IN_F={A}"\n'
    tree = ast.parse(source)
    prose = _docstrings(tree)
    hits = [
        n.value
        for n in ast.walk(tree)
        if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in prose and NAME.search(n.value)
    ]
    assert sorted(hits) == ["TWLLM_PLAIN", "set TWLLM_IN_F="]


def test_every_name_in_the_table_has_a_meaning() -> None:
    names = [name for name, _ in TABLE]
    assert len(names) == len(set(names)), "a name is listed twice"
    for name, meaning in TABLE:
        assert re.fullmatch(r"[A-Z][A-Z0-9_]*", name), name
        assert meaning.strip(), f"{name} has no meaning"
        assert meaning.strip()[-1] in ".)", f"{name}: end its meaning with a full stop"
    assert VARIABLES == dict(TABLE)


def test_every_name_constant_is_in_the_table() -> None:
    constants = {
        attr: value
        for attr, value in vars(settings).items()
        if attr.endswith("_ENV") and attr.isupper() and isinstance(value, str)
    }
    assert constants, "settings.py names its variables as *_ENV constants"
    assert sorted(set(constants.values()) - set(VARIABLES)) == []
    assert sorted(set(VARIABLES) - set(constants.values())) == []


def test_settings_imports_nothing_from_twllm() -> None:
    tree = ast.parse(SETTINGS_FILE.read_text(encoding="utf-8"))
    imported = [alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names] + [
        node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
    ]
    assert [m for m in imported if m == "twllm" or m.startswith("twllm.")] == []


def test_settings_read_the_table_names() -> None:
    env = {settings.STATE_DIR_ENV: "/srv/x", settings.GPUS_ENV: "2", settings.DEBUG_ENV: "1"}
    got = Settings.from_env(env)
    assert (got.state_dir, got.gpus, got.debug) == (Path("/srv/x"), 2, True)
