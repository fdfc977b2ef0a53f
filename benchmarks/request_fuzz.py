"""Fuzzed requests against the real gateway, at benchmark size: 10,000 cases and a table.

The same strategies, gateway and checks as tests/integration/test_request_fuzz.py (one copy, in
tests/fuzzutil.py): the real gateway (twllm's entry point, LiteLLM behind the shield, one
worker, custom auth and the ledger against an embedded PostgreSQL, the PII guard stage) in front
of ``echo_upstream``, a stand-in OpenAI engine. Cases are shared among the strategies as in CI
(json 50 %, raw 20 %, headers 15 %, keys 15 %), sent one at a time, and every answer is judged:
status, OpenAI's error shape (bodies and stream events), leaks of the machinery. At the end the
gateway's log is searched for tracebacks.

Prints cases per endpoint and strategy, status counts, 5xx the gateway made (and 502/503/504 the
stand-in engine caused by failing on a request), tracebacks, and every problem (first few in full).

    .venv/bin/python benchmarks/request_fuzz.py [--cases 10000] [--show 20] [--json]

Exit status 1 when any case broke the gateway's promise.
"""

from __future__ import annotations

import argparse
import collections
import json
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
import fuzzutil
from hypothesis import HealthCheck, given, settings
from pgutil import Postgres

from twllm.accounting.migrate import migrate


def run(cases: int, show: int, keep: Path | None = None) -> dict:
    folder = Path(tempfile.mkdtemp(prefix="twllm-reqfuzz-"))
    pg = Postgres(folder)
    pg.start()
    outcomes: list[fuzzutil.Outcome] = []
    began = time.monotonic()
    try:
        migrate(pg.url)
        started = fuzzutil.start(folder, pg.url)
        try:
            gateway = started.gateway
            with gateway.client() as client:
                for name, count in fuzzutil.shares(cases).items():

                    @settings(
                        max_examples=count,
                        deadline=None,
                        derandomize=True,
                        database=None,
                        suppress_health_check=list(HealthCheck),
                    )
                    @given(case=fuzzutil.STRATEGIES[name]())
                    def fuzz(case: fuzzutil.Case) -> None:
                        outcomes.append(fuzzutil.send(client, gateway, case))

                    fuzz.__name__ = f"bench_fuzz_{name}"
                    fuzz()
                    print(f"{name}: {count} asked, {sum(o.case.group == name for o in outcomes)} sent", flush=True)
            log = gateway.proxy.log_text()
            upstream_failures = list(gateway.upstream_failures)
        finally:
            started.stop()
    finally:
        pg.stop(signal.SIGKILL)
        took = time.monotonic() - began
    traces = fuzzutil.tracebacks(log)
    report = summarize(outcomes, traces, upstream_failures, took)
    if keep is not None:  # the whole log and every problem case in full, to replay them
        keep.mkdir(parents=True, exist_ok=True)
        (keep / "gateway.log").write_text(log)
        with (keep / "problems.txt").open("w") as out:
            for o in outcomes:
                if o.problems:
                    c = o.case
                    out.write(f"{o.status} {o.problems}\n{c.method} {c.path} key={c.key!r} ")
                    out.write(f"content-type={c.content_type!r} headers={list(c.headers)!r}\nbody={c.body!r}\n\n")
    print_table(report, outcomes, traces, show)
    shutil.rmtree(folder, ignore_errors=True)
    return report


def summarize(outcomes: list[fuzzutil.Outcome], traces: list[str], upstream_failures: list[str], took: float) -> dict:
    problems = [o for o in outcomes if o.problems]
    return {
        "cases": len(outcomes),
        "seconds": round(took, 1),
        "by_strategy": dict(collections.Counter(o.case.group for o in outcomes)),
        "by_endpoint": dict(collections.Counter(o.case.endpoint for o in outcomes)),
        "statuses": {str(k): v for k, v in sorted(collections.Counter(o.status or 0 for o in outcomes).items())},
        "streams": sum(o.stream for o in outcomes),
        "5xx_ours": sum(1 for o in outcomes if (o.status or 0) >= 500 and not o.upstream_5xx),
        "5xx_upstream": sum(o.upstream_5xx for o in outcomes),
        "upstream_failures": dict(collections.Counter(f.split("(")[0] for f in upstream_failures)),
        "no_answer": sum(o.status is None for o in outcomes),
        "not_openai_shaped": sum(
            any("shape" in p or "error." in p or "not JSON" in p for p in o.problems) for o in outcomes
        ),
        "cases_with_problems": len(problems),
        "tracebacks_in_log": len(traces),
    }


def print_table(report: dict, outcomes: list[fuzzutil.Outcome], traces: list[str], show: int) -> None:
    print(f"\n{report['cases']} cases in {report['seconds']} s ({report['cases'] / report['seconds']:.1f}/s)")
    by = collections.defaultdict(collections.Counter)
    for o in outcomes:
        by[o.case.endpoint][o.status or 0] += 1
    statuses = sorted({s for c in by.values() for s in c})
    print("\n" + f"{'endpoint':<12}{'cases':>7}" + "".join(f"{s or 'none':>7}" for s in statuses))
    for endpoint in sorted(by):
        counts = by[endpoint]
        row = "".join(f"{counts.get(s, 0):>7}" for s in statuses)
        print(f"{endpoint:<12}{sum(counts.values()):>7}{row}")
    print(f"\nby strategy: {report['by_strategy']}")
    print(f"streams consumed: {report['streams']}")
    print(f"5xx from our code: {report['5xx_ours']}")
    print(
        f"5xx of the stand-in engine (it failed on the request): {report['5xx_upstream']} {report['upstream_failures']}"
    )
    print(f"no answer: {report['no_answer']}")
    print(f"errors not in OpenAI's shape: {report['not_openai_shaped']}")
    print(f"cases with any problem: {report['cases_with_problems']}")
    print(f"tracebacks in the gateway log: {report['tracebacks_in_log']}")
    kinds = collections.Counter(o.problems[0][:90] for o in outcomes if o.problems)
    for text, count in kinds.most_common(30):
        print(f"  {count:>5}  {text}")
    for o in [o for o in outcomes if o.problems][:show]:
        print(f"\n--- {o.status} {o.problems}\n    {o.case.describe()}")
    for trace in traces[:show]:
        print(f"\n--- traceback in the log:\n{trace}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=10_000)
    parser.add_argument("--show", type=int, default=10, help="problem cases and tracebacks shown in full")
    parser.add_argument("--json", action="store_true", help="also print the summary as JSON")
    parser.add_argument("--keep", type=Path, help="write the gateway log and every problem case in full here")
    args = parser.parse_args()
    report = run(args.cases, args.show, args.keep)
    if args.json:
        print(json.dumps(report, indent=2))
    sys.exit(1 if report["cases_with_problems"] or report["tracebacks_in_log"] else 0)


if __name__ == "__main__":
    main()
