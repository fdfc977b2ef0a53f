"""Guard model micro-benchmark: per-check latency of the tiny Llama Guard and tiny Prompt Guard.

Both models are built on the spot (tiny_guard_models) into a temporary folder and loaded
through transformers, exactly as the gateway loads real ones. Each row is N timed checks after a
few warm-up checks, one thread (torch.set_num_threads(1), OMP_NUM_THREADS=1), CPU by default:

  llama_guard input  safe     check_input on a short Traditional Chinese question ("\\n\\nsafe", 3 tokens)
  llama_guard input  unsafe   the same with the trigger ("\\n\\nunsafe\\nS1", 6 tokens)
  llama_guard output safe     check_output: a question and a ~100-character answer
  prompt_guard short          screen() on one sentence (1 window)
  prompt_guard long           screen() on ~8,000 characters (several 512-token windows)

The tiny models have 1 layer and hidden size 64 / 32: these numbers are the fixed cost of the
check path (templating, tokenizing, generate's loop, decoding), not what a 1B or 8B guard costs.

    .venv/bin/python benchmarks/guard_bench.py [--checks 50] [--device cpu|cuda] [--json]
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch is imported

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

QUESTION = [
    {"role": "system", "content": "你是一個樂於助人的助理。"},
    {"role": "user", "content": "請問臺北今天的天氣如何？下午需要帶傘嗎？"},
]
TRIGGER = "炸彈"
ANSWER = (
    "今天臺北多雲時晴，午後山區可能有短暫雷陣雨，氣溫攝氏 24 到 31 度。"
    "如果下午要出門，建議帶一把折疊傘，並多補充水分，注意防曬。"
) * 2
SENTENCE = "Please summarise the attached meeting notes and list the decisions by Friday."
LONG = (
    "The meeting is on Friday and the weather in Taipei is sunny. 今天天氣晴朗，記得帶傘，並把會議紀錄寄給大家。"
) * 80


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100)."""
    ordered = sorted(values)
    rank = max(1, round(q / 100 * len(ordered)))
    return ordered[rank - 1]


def timed(fn: Callable[[], float], checks: int, warmup: int) -> list[float]:
    """Each check's latency in ms (as the check itself reports it)."""
    for _ in range(warmup):
        fn()
    return [fn() for _ in range(checks)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checks", type=int, default=50, help="timed checks per row")
    parser.add_argument("--warmup", type=int, default=5, help="untimed checks before each row")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    parser.add_argument("--json", action="store_true", help="print one JSON document instead")
    args = parser.parse_args()

    import torch
    import transformers

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the tests' model builders
    from tiny_guard_models import build_tiny_llama_guard, build_tiny_prompt_guard

    from twllm.guard.llama_guard import LlamaGuard, build_prompt
    from twllm.guard.prompt_guard import PromptGuard

    torch.set_num_threads(1)
    transformers.utils.logging.disable_progress_bar()
    with tempfile.TemporaryDirectory(prefix="guard-bench-") as folder:
        start = time.perf_counter()
        lg_dir = build_tiny_llama_guard(Path(folder) / "llama-guard", trigger=TRIGGER)
        pg_dir = build_tiny_prompt_guard(Path(folder) / "prompt-guard")
        build_s = time.perf_counter() - start
        start = time.perf_counter()
        llama_guard = LlamaGuard(lg_dir, device=args.device)
        prompt_guard = PromptGuard(pg_dir, device=args.device)
        load_s = time.perf_counter() - start

        unsafe = [QUESTION[0], {"role": "user", "content": QUESTION[1]["content"] + TRIGGER}]
        assert llama_guard.check_input(QUESTION).safe and not llama_guard.check_input(unsafe).safe

        def tokens(messages: list[dict[str, str]], role: str) -> int:
            prompt = build_prompt(messages, role, (), llama_guard.tokenizer)  # type: ignore[arg-type]
            return len(llama_guard.tokenizer(prompt, add_special_tokens=False)["input_ids"])

        answered = QUESTION + [{"role": "assistant", "content": ANSWER}]
        cases: list[tuple[str, str, Callable[[], float], int]] = [
            (
                "llama_guard",
                "input safe",
                lambda: llama_guard.check_input(QUESTION).latency_ms,
                tokens(QUESTION, "user"),
            ),
            ("llama_guard", "input unsafe", lambda: llama_guard.check_input(unsafe).latency_ms, tokens(unsafe, "user")),
            (
                "llama_guard",
                "output safe",
                lambda: llama_guard.check_output(QUESTION, ANSWER).latency_ms,
                tokens(answered, "assistant"),
            ),
            (
                "prompt_guard",
                "short",
                lambda: prompt_guard.screen(SENTENCE).latency_ms,
                prompt_guard.screen(SENTENCE).windows,
            ),
            ("prompt_guard", "long", lambda: prompt_guard.screen(LONG).latency_ms, prompt_guard.screen(LONG).windows),
        ]
        rows = []
        for model, case, fn, size in cases:
            ms = timed(fn, args.checks, args.warmup)
            rows.append(
                {
                    "model": model,
                    "case": case,
                    "checks": len(ms),
                    "size": size,
                    "p50_ms": round(statistics.median(ms), 2),
                    "p95_ms": round(percentile(ms, 95), 2),
                    "mean_ms": round(statistics.fmean(ms), 2),
                    "max_ms": round(max(ms), 2),
                }
            )

    meta = {
        "python": sys.version.split()[0],
        "machine": platform.machine(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "device": llama_guard.device,
        "threads": torch.get_num_threads(),
        "build_s": round(build_s, 2),
        "load_s": round(load_s, 2),
    }
    if args.json:
        json.dump({**meta, "rows": rows}, sys.stdout, indent=2)
        print()
        return 0
    print(
        f"python {meta['python']} on {meta['machine']}, torch {meta['torch']}, transformers "
        f"{meta['transformers']}, device {meta['device']}, {meta['threads']} thread(s); "
        f"build {build_s:.2f} s, load {load_s:.2f} s; {args.checks} checks per row"
    )
    print("size: prompt tokens (llama_guard), 512-token windows (prompt_guard)")
    header = ("model", "case", "size", "p50 ms", "p95 ms", "mean ms", "max ms")
    print("{:<13} {:<13} {:>5} {:>8} {:>8} {:>8} {:>8}".format(*header))
    for r in rows:
        print(
            f"{r['model']:<13} {r['case']:<13} {r['size']:>5} {r['p50_ms']:>8.2f} {r['p95_ms']:>8.2f} "
            f"{r['mean_ms']:>8.2f} {r['max_ms']:>8.2f}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
