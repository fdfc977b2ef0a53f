"""The layout's rules, checked on the import graph: no cycles, the stage contracts kept, every
module opening with what it is for. CI also runs `lint-imports`; these tests make `pytest` alone
fail the day someone adds a cycle."""

from __future__ import annotations

import ast
import os
from pathlib import Path

import grimp
import pytest

import twllm

PACKAGE = Path(twllm.__file__).parent
ROOT = PACKAGE.parent
STAGES = ("spec", "plan", "render", "runtime")


@pytest.fixture(scope="module")
def graph() -> grimp.ImportGraph:
    return grimp.build_graph("twllm", include_external_packages=False, cache_dir=None)


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one member (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0
    for start in sorted(edges):
        if start in index:
            continue
        work = [(start, iter(sorted(edges[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            for child in children:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges.get(child, ())))))
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        found.append(sorted(component))
    return found


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_module_imports_itself_back(graph: grimp.ImportGraph) -> None:
    edges = {m: set(graph.find_modules_directly_imported_by(m)) for m in graph.modules}
    assert _cycles(edges) == []


def test_no_two_packages_import_each_other(graph: grimp.ImportGraph) -> None:
    def package(module: str) -> str:
        return ".".join(module.split(".")[:2])

    edges: dict[str, set[str]] = {}
    for module in graph.modules:
        for imported in graph.find_modules_directly_imported_by(module):
            if package(imported) != package(module):
                edges.setdefault(package(module), set()).add(package(imported))
            edges.setdefault(package(imported), set())
    assert _cycles(edges) == []


def test_the_import_contracts_in_pyproject_are_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    from importlinter.cli import lint_imports

    monkeypatch.chdir(ROOT)
    assert lint_imports(no_cache=True) == 0  # see the report above for the broken contract


def test_the_four_stages_have_their_folders() -> None:
    for stage in STAGES:
        assert (PACKAGE / stage / "__init__.py").is_file(), stage
    assert not (PACKAGE / "deploy").exists()


def test_every_module_says_what_it_is_for() -> None:
    missing = []
    for path in sorted(PACKAGE.rglob("*.py")):
        doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8")))
        if not doc or not doc.strip().splitlines()[0].strip():
            missing.append(os.path.relpath(path, ROOT))
    assert missing == []


def test_no_test_helpers_ship_in_the_package() -> None:
    names = {p.stem for p in PACKAGE.rglob("*.py")}
    assert not {n for n in names if n.startswith(("tiny_", "fake_", "test_"))}


# Where JSON may be written or parsed by hand. A file that one process writes and another reads is
# a pydantic model that writes and reads itself (plan.json: twllm.plan.model.Plan; gateway.json:
# twllm.gateway.settings.GatewaySettings; state.json: twllm.runtime.state.DeploymentState); every
# other use of `json` is listed here with why it is not such a file.
HAND_JSON = {
    "twllm/plan/model.py": "the Plan contract itself",
    "twllm/gateway/settings.py": "the GatewaySettings contract itself",
    "twllm/status.py": "the DeploymentState contract itself",
    "twllm/cli/accounts_cmds.py": "--json documents on stdout",
    "twllm/cli/bench_cmds.py": "--json documents on stdout",
    "twllm/cli/commands.py": "--json documents on stdout",
    "twllm/cli/engines_cmds.py": "--json documents on stdout",
    "twllm/cli/eval_cmds.py": "--json documents on stdout",
    "twllm/cli/guard_cmds.py": "--json documents on stdout",
    "twllm/cli/runtime_cmds.py": "--json documents on stdout",
    "twllm/gateway/errors.py": "OpenAI error bodies on the wire",
    "twllm/gateway/asgi.py": "SSE events on the wire",
    "twllm/gateway/responses.py": "a Responses stream's failure event on the wire",
    "twllm/gateway/score.py": "a score request and answer on the wire, translated to and from a rerank",
    "twllm/console/api.py": "the console's JSON request bodies on the wire",
    "twllm/console/app.py": "the console's JSON responses on the wire",
    "twllm/guard/gateway.py": "an SSE error event on the wire",
    "twllm/zh_tw/structured.py": "a model's JSON answer, read and rewritten value by value in place",
    "twllm/runtime/engines/ollama.py": "Ollama's streamed progress lines on the wire",
    "twllm/runtime/components.py": "a fingerprint hashed from plan data, never stored",
    "twllm/render/monitoring.py": "the Grafana dashboard: Grafana's own JSON model, read by Grafana only",
    "twllm/runtime/engines/envs.py": "an engine environment's install record, written and read by this module only",
    "twllm/demo/build_script.py": "a model folder's build record, from a script that runs without twllm",
    "twllm/accounting/ledger.py": "LedgerRow.to_json/from_json: the spool's rows",
    "twllm/accounting/spool.py": "one LedgerRow document per spool line",
    "twllm/bench/load.py": "a load test's samples (Sample.to_json) and SSE events",
    "twllm/bench/locustfile.py": "the samples file locust workers write for bench.report",
    "twllm/bench/report.py": "reads the samples file bench.load's Sample wrote",
}


def test_json_is_handled_by_hand_only_where_listed() -> None:
    found: dict[str, list[int]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = os.path.relpath(path, ROOT)
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and isinstance(node.func.value, ast.Name)
                and node.func.value.id == "json"
                and node.func.attr in ("load", "loads", "dump", "dumps")
            ):
                found.setdefault(rel, []).append(node.lineno)
    unlisted = {rel: lines for rel, lines in found.items() if rel not in HAND_JSON}
    assert unlisted == {}, "a file shared between processes must be a pydantic model; else list it with why"
    assert sorted(set(HAND_JSON) - set(found)) == []  # stale entries go
