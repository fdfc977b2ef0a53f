"""zh-TW normaliser micro-benchmark: throughput (characters/s) and added latency per streamed chunk.

Texts of ~100,000 characters built from fixed paragraphs:

  simplified   a Simplified answer: every segment goes through s2twp and the extra terms
  traditional  a Taiwan Traditional answer: detection only (the fast path), nothing converted
  mixed        Traditional and Simplified paragraphs, English, inline code, a URL and a code block
  opencc       bare OpenCC s2twp on the Simplified text, for scale

Throughput rows are normalize(text), the best of several rounds (timeit-style: the minimum is the
least disturbed measurement). Stream rows feed the mixed text to StreamNormalizer in chunks of
1-4 characters (token-sized) and report the mean and p99 time of one feed() call, flush included.

    .venv/bin/python benchmarks/zh_tw_bench.py [--rounds N] [--json]
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import opencc

from twllm.zh_tw import StreamNormalizer, normalize

SIMPLIFIED = (
    "这个软件的信息存储在服务器上，用户可以通过视频会议讨论项目进度。"
    "如果硬盘坏了，请先备份数据库，然后联系客服。我每天坐公交车上班，产品质量很好！\n"
)
TRADITIONAL = (
    "這個軟體的資訊存放在伺服器上，使用者可以透過視訊會議討論專案進度。"
    "干擾訊號排除後，後面的頭髮造型也完成了，台灣的朋友發現這裡很好用！\n"
)
MIXED = (
    TRADITIONAL + SIMPLIFIED + "The gateway routes each request to a vLLM engine; see "
    "https://example.com/docs?id=42 for details. 用 `print('软件')` 测试。\n"
    "```python\n# 这是注释\nx = load('服务器')\n```\n"
)
SIZE = 100_000


def _text(paragraph: str) -> str:
    return (paragraph * (SIZE // len(paragraph) + 1))[:SIZE]


def throughput(func, text: str, rounds: int) -> float:
    best = min(_timed(func, text) for _ in range(rounds))
    return len(text) / best


def _timed(func, text: str) -> float:
    started = time.perf_counter()
    func(text)
    return time.perf_counter() - started


def stream_latency(text: str, chunk: int) -> tuple[float, float]:
    """(mean, p99) microseconds per feed() call, chunks of ``chunk`` characters."""
    stream, times = StreamNormalizer(), []
    for i in range(0, len(text), chunk):
        piece = text[i : i + chunk]
        started = time.perf_counter()
        stream.feed(piece)
        times.append(time.perf_counter() - started)
    started = time.perf_counter()
    stream.flush()
    times.append(time.perf_counter() - started)
    times.sort()
    return sum(times) / len(times) * 1e6, times[int(0.99 * (len(times) - 1))] * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    normalize(SIMPLIFIED)  # load the OpenCC dictionaries outside the timings
    s2twp = opencc.OpenCC("s2twp").convert
    rows = {
        name: throughput(normalize, _text(p), args.rounds)
        for name, p in (("simplified", SIMPLIFIED), ("traditional", TRADITIONAL), ("mixed", MIXED))
    }
    rows["opencc s2twp"] = throughput(s2twp, _text(SIMPLIFIED), args.rounds)
    mixed = _text(MIXED)[:20_000]
    streams = {chunk: stream_latency(mixed, chunk) for chunk in (1, 2, 4)}
    if args.json:
        print(
            json.dumps(
                {
                    "chars_per_s": rows,
                    "feed_us": {str(k): {"mean": m, "p99": p} for k, (m, p) in streams.items()},
                    "python": platform.python_version(),
                    "opencc": opencc.__version__,
                },
                indent=2,
            )
        )
        return
    print(f"python {platform.python_version()}, opencc {opencc.__version__}, {SIZE:,} characters per text")
    print(f"{'text':<14}{'M chars/s':>12}")
    for name, rate in rows.items():
        print(f"{name:<14}{rate / 1e6:>12.2f}")
    print(f"\n{'chunk (chars)':<14}{'feed mean µs':>14}{'feed p99 µs':>13}")
    for chunk, (mean, p99) in streams.items():
        print(f"{chunk:<14}{mean:>14.1f}{p99:>13.1f}")


if __name__ == "__main__":
    main()
