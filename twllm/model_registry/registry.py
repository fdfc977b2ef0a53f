"""Model registry: loads the catalog YAML files into validated ModelEntry objects and looks them up.

The built-in catalog ships inside the package (`catalog/<family>.yaml`) and is read through
`importlib.resources`, so it works from a wheel or zip as well as from a checkout. Extra
directories of `<family>.yaml` files may add entries; an id defined twice is an error.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from ruamel.yaml import YAML
from ruamel.yaml.error import YAMLError

from twllm.errors import RegistryError, did_you_mean

from .entry import ModelEntry

CATALOG_PACKAGE = "twllm.model_registry"
CATALOG_DIR = "catalog"
LIST_HINT = "run `twllm models list` to see every registry id"


class Registry:
    """Every known model, by id; entries ordered by family, then id."""

    def __init__(self, entries: Iterable[ModelEntry]) -> None:
        by_id: dict[str, ModelEntry] = {}
        for entry in entries:
            if entry.id in by_id:
                raise RegistryError(
                    f"duplicate model id '{entry.id}' (families '{by_id[entry.id].family}' and '{entry.family}')"
                )
            by_id[entry.id] = entry
        self._entries = tuple(sorted(by_id.values(), key=lambda e: (e.family, e.id)))
        self._by_id = {e.id: e for e in self._entries}
        self._by_repo = {e.hf_repo.lower(): e for e in self._entries}

    @property
    def entries(self) -> tuple[ModelEntry, ...]:
        """All entries, ordered by family then id."""
        return self._entries

    @property
    def ids(self) -> tuple[str, ...]:
        """All ids, in `entries` order."""
        return tuple(e.id for e in self._entries)

    @property
    def families(self) -> tuple[str, ...]:
        """Family names, sorted."""
        return tuple(sorted({e.family for e in self._entries}))

    def get(self, model_id: str) -> ModelEntry:
        """The entry with this id; RegistryError (with a did-you-mean) when there is none."""
        try:
            return self._by_id[model_id]
        except KeyError:
            suggestion = did_you_mean(model_id, self._by_id)
            raise RegistryError(f"unknown model '{model_id}'{suggestion}", hint=LIST_HINT) from None

    def find_by_hf_repo(self, repo: str) -> ModelEntry | None:
        """The entry whose hf_repo matches `repo` ignoring case, or None."""
        return self._by_repo.get(repo.strip().lower())

    def __contains__(self, model_id: object) -> bool:
        return model_id in self._by_id

    def __iter__(self) -> Iterator[ModelEntry]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({len(self)} entries, families={list(self.families)})"


@dataclass(frozen=True)
class _Located:
    """An entry validated from a catalog file, with where it came from for error messages."""

    entry: ModelEntry
    where: str


def load_registry(extra_dirs: Sequence[Path] = ()) -> Registry:
    """The built-in catalog plus every `*.yaml` in `extra_dirs`; the no-extras case is cached."""
    if not extra_dirs:
        return _default_registry()
    files: list[Traversable] = list(_builtin_files())
    for directory in extra_dirs:
        directory = Path(directory)
        if not directory.is_dir():
            raise RegistryError(f"{directory}: model catalog directory not found")
        files.extend(sorted(directory.glob("*.yaml"), key=lambda p: p.name))
    return _build(files)


@functools.lru_cache(maxsize=1)
def _default_registry() -> Registry:
    return _build(_builtin_files())


def _builtin_files() -> list[Traversable]:
    catalog = resources.files(CATALOG_PACKAGE) / CATALOG_DIR
    return sorted(
        (f for f in catalog.iterdir() if f.is_file() and f.name.endswith(".yaml")),
        key=lambda f: f.name,
    )


def _build(files: Iterable[Traversable]) -> Registry:
    problems: list[str] = []
    seen: dict[str, str] = {}
    located: list[_Located] = []
    for file in files:
        for item in _load_file(file, problems):
            first = seen.get(item.entry.id)
            if first is not None:
                problems.append(f"{item.where}: duplicate model id '{item.entry.id}' (first defined at {first})")
                continue
            seen[item.entry.id] = item.where
            located.append(item)
    if problems:
        raise RegistryError(
            "invalid model catalog:\n" + "\n".join(f"  {p}" for p in problems),
            hint="fix the catalog entries named above",
        )
    return Registry(item.entry for item in located)


def _load_file(file: Traversable, problems: list[str]) -> list[_Located]:
    """Validated entries of one catalog file; each problem found is appended to `problems`."""
    name = str(file)
    family = file.name.removesuffix(".yaml")
    try:
        data = YAML(typ="rt").load(file.read_text(encoding="utf-8"))
    except (YAMLError, UnicodeDecodeError, OSError) as exc:
        problems.append(f"{name}: cannot read YAML: {exc}".replace("\n", " "))
        return []
    if not isinstance(data, dict) or set(data) != {"models"} or not isinstance(data["models"], list):
        problems.append(f"{name}: expected a single top-level key 'models' holding a list")
        return []
    out: list[_Located] = []
    for index, raw in enumerate(data["models"]):
        entry_line = _line_of_item(data["models"], index)
        if not isinstance(raw, dict):
            problems.append(f"{_where(name, entry_line, index)}: expected a mapping of fields")
            continue
        model_id = raw.get("id") if isinstance(raw.get("id"), str) else None
        if "family" in raw:
            where = _where(name, _line_of_key(raw, "family") or entry_line, index, model_id)
            problems.append(f"{where}.family: not allowed; the family is the file name ('{family}')")
            continue
        try:
            entry = ModelEntry.model_validate({**_plain(raw), "family": family})
        except ValidationError as exc:
            for err in exc.errors(include_url=False):
                loc = [str(part) for part in err["loc"]]
                line = (_line_of_key(raw, loc[0]) if loc else None) or entry_line
                path = "." + ".".join(loc) if loc else ""
                message = err["msg"].removeprefix("Value error, ")
                problems.append(f"{_where(name, line, index, model_id)}{path}: {message}")
            continue
        out.append(_Located(entry, _where(name, entry_line, index, model_id)))
    return out


def _where(file: str, line: int | None, index: int, model_id: str | None = None) -> str:
    """'file:line models[i] (id)': where an entry or one of its fields sits."""
    place = f"{file}:{line}" if line is not None else file
    label = f" ({model_id})" if model_id else ""
    return f"{place} models[{index}]{label}"


def _line_of_item(seq: Any, index: int) -> int | None:
    try:
        return int(seq.lc.item(index)[0]) + 1
    except (AttributeError, KeyError, IndexError, TypeError):
        return None


def _line_of_key(mapping: Any, key: str) -> int | None:
    try:
        return int(mapping.lc.key(key)[0]) + 1
    except (AttributeError, KeyError, IndexError, TypeError):
        return None


def _plain(node: Any) -> Any:
    """ruamel's round-trip nodes turned into plain dict/list/str/int/float/bool."""
    if isinstance(node, dict):
        return {str(k): _plain(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_plain(v) for v in node]
    if isinstance(node, bool):
        return bool(node)
    if isinstance(node, int):
        return int(node)
    if isinstance(node, float):
        return float(node)
    if isinstance(node, str):
        return str(node)
    return node
