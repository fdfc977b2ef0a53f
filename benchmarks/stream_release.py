"""How promptly streamed answers leave the output stages: non-empty releases per engine chunk.

A ~200-token answer (Simplified Chinese with mainland terms, its Taiwan Traditional version, and
English) is cut into token-sized pieces and fed, one piece per call, through the gateway's
``OutputStream`` with the output stages ``[pii, zh_tw]``, ``[zh_tw]`` and ``[pii]`` (no Llama
Guard gate). Per text it reports: pieces, how many produced a non-empty release (the chunks the
client gets), the pieces before the first release, the characters left for the final flush, the
characters held after each feed (mean and max, summed over the stages) and the time per feed.
With ``--baseline REF`` (default: the commit before stages released early) ``[pii, zh_tw]`` is
also measured as it was at REF, loaded from git, chained the same way.

Pieces: English words as one piece with their leading space (longer words in 3–5-letter
parts, as BPE splits them), punctuation alone; Chinese 1–2 characters per piece (seeded), and a
worst case of one character per piece.

    .venv/bin/python benchmarks/stream_release.py [--baseline REF|none] [--json]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from twllm.guard.pipeline import GuardPipeline
from twllm.guard.streaming import OutputStream
from twllm.spec.schema import GuardSpec

ROOT = Path(__file__).resolve().parent.parent
BASELINE = "abd87a5"
"""The last commit whose stages held text until a sentence ended (zh_tw) or kept two characters
of lookahead (pii)."""

SIMPLIFIED = (
    "您好！关于您的问题，我整理了以下几点建议：\n"
    "1. 先确认软件已经更新到最新版本，旧版本的信息同步功能可能不稳定。\n"
    "2. 如果视频会议经常中断，请检查网络设置，并重新启动服务器上的服务。\n"
    "3. 用户账号的数据都存储在数据库里，修改密码以后需要重新登录。\n"
    "4. 手机充值或者外卖订单出现问题，可以拨打客服电话 0800-123-456 咨询。\n"
    "另外，产品质量和服务质量都是我们非常重视的部分。如果您还有其他问题，"
    "欢迎随时通过电子邮箱 support@example.com 联系我们，我们会尽快回复您。"
)
ENGLISH = (
    "Thanks for the question. Here is a short overview of how the gateway handles a streamed "
    "request. First, it checks the API key and the tenant's budget, then it screens the prompt "
    "for personal data such as ID numbers and phone numbers. Next, the router picks a healthy "
    "engine for the requested model and forwards the request; if that engine is overloaded, it "
    "retries another deployment. While the model generates the answer, every chunk passes "
    "through the output stages, which mask personal data and normalise Simplified characters to "
    "Taiwan Traditional, releasing text as soon as it can no longer change. Finally, the gateway "
    "records tokens, latency and cost for the tenant, so that the monthly report shows who used "
    "which model and how much it cost. If you need more details, see the documentation at "
    "https://example.com/docs or write to ops@example.com, and we will reply within one day."
)


def english_pieces(text: str) -> list[str]:
    pieces = []
    for word in re.findall(r" ?[A-Za-z]+| ?[0-9]+| ?[^ A-Za-z0-9]| +", text):
        while len(word.strip()) > 6:  # BPE-like: long words in parts
            cut = 4 if word[0] == " " else 3
            pieces.append(word[: cut + 1])
            word = word[cut + 1 :]
        pieces.append(word)
    return pieces


def chinese_pieces(text: str, rng: random.Random, most: int = 2) -> list[str]:
    pieces, i = [], 0
    while i < len(text):
        if text[i].isascii():
            j = i + 1
            while j < len(text) and text[j].isascii() and text[j].isalnum() == text[i].isalnum():
                j += 1
            n = j - i
        else:
            n = rng.randint(1, most)
        pieces.append(text[i : i + n])
        i += n
    return pieces


def _load(ref: str, path: str, name: str):
    source = subprocess.run(
        ["git", "-C", str(ROOT), "show", f"{ref}:{path}"], check=True, capture_output=True, text=True
    ).stdout
    folder = Path(tempfile.mkdtemp())
    (folder / f"{name}.py").write_text(source, encoding="utf-8")
    spec = importlib.util.spec_from_file_location(name, folder / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


class _Baseline:
    """The pii and zh_tw stream stages at REF, chained as OutputStream chains them."""

    def __init__(self, pii, normalize) -> None:
        self.masker = pii.StreamMasker(pii.PiiPolicy())
        self.normalizer = normalize.StreamNormalizer()
        self.fed = self.out_in = 0

    def feed(self, piece: str) -> str:
        masked = self.masker.feed(piece)
        return self.normalizer.feed(masked)

    def flush(self) -> str:
        return self.normalizer.feed(self.masker.flush()) + self.normalizer.flush()


def measure(make, pieces: list[str]) -> dict:
    stream = make()
    released, held, times = [], [], []
    for piece in pieces:
        started = time.perf_counter()
        released.append(stream.feed(piece))
        times.append(time.perf_counter() - started)
        held.append(getattr(stream, "held", None))
    tail = stream.flush()
    nonempty = sum(map(bool, released))
    first = next((i for i, r in enumerate(released) if r), len(released))
    times.sort()
    row = {
        "pieces": len(pieces),
        "releases": nonempty,
        "ratio": nonempty / len(pieces),
        "pieces_before_first_release": first,
        "left_for_flush": len(tail),
        "feed_us_mean": statistics.fmean(times) * 1e6,
        "feed_us_p99": times[int(0.99 * (len(times) - 1))] * 1e6,
        "text": "".join(released) + tail,
    }
    if held[0] is not None:
        row |= {"held_mean": statistics.fmean(held), "held_max": max(held)}
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", default=BASELINE, help="git ref of the old stages, or 'none'")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    from twllm.zh_tw import normalize

    pipeline_spec = GuardSpec(output=["pii", "zh_tw"])
    rng = random.Random(2026)
    traditional = normalize(SIMPLIFIED)
    cases = {
        "simplified, 1-2 chars": chinese_pieces(SIMPLIFIED, rng),
        "simplified, 1 char": chinese_pieces(SIMPLIFIED, rng, most=1),
        "traditional, 1-2 chars": chinese_pieces(traditional, rng),
        "traditional, 1 char": chinese_pieces(traditional, rng, most=1),
        "english, BPE-like": english_pieces(ENGLISH),
    }
    makers = {
        "pii+zh_tw": lambda: OutputStream(GuardPipeline(pipeline_spec), [], 0),
        "zh_tw": lambda: OutputStream(GuardPipeline(GuardSpec(output=["zh_tw"])), [], 0),
        "pii": lambda: OutputStream(GuardPipeline(GuardSpec(output=["pii"])), [], 0),
    }
    if args.baseline != "none":
        try:
            old = (
                _load(args.baseline, "twllm/guard/pii.py", "baseline_pii"),
                _load(args.baseline, "twllm/zh_tw/normalize.py", "baseline_normalize"),
            )
            makers["pii+zh_tw@" + args.baseline] = lambda: _Baseline(*old)
        except (subprocess.CalledProcessError, OSError) as error:
            print(f"(no baseline: {error})", file=sys.stderr)
    makers["zh_tw"]().feed("暖")  # load the tables outside the timings
    results = {case: {who: measure(make, pieces) for who, make in makers.items()} for case, pieces in cases.items()}
    for case, rows in results.items():
        texts = {who: row.pop("text") for who, row in rows.items()}
        assert len({t for who, t in texts.items() if who.startswith("pii+zh_tw")}) == 1, f"{case}: versions disagree"
    if args.json:
        print(json.dumps(results, indent=2, ensure_ascii=False))
        return
    print(f"OutputStream, no gate; {platform()}")
    print(
        f"{'answer, pieces':<24}{'stages':<19}{'pieces':>7}{'releases':>9}{'ratio':>7}{'1st at':>7}"
        f"{'flush':>6}{'held mean':>10}{'held max':>9}{'feed µs':>8}{'p99 µs':>8}"
    )
    for case, rows in results.items():
        for who, r in rows.items():
            held = f"{r['held_mean']:>10.1f}{r['held_max']:>9d}" if "held_mean" in r else f"{'-':>10}{'-':>9}"
            print(
                f"{case:<24}{who:<19}{r['pieces']:>7d}{r['releases']:>9d}{r['ratio']:>7.2f}"
                f"{r['pieces_before_first_release']:>7d}{r['left_for_flush']:>6d}{held}"
                f"{r['feed_us_mean']:>8.1f}{r['feed_us_p99']:>8.1f}"
            )


def platform() -> str:
    import platform as p

    import opencc

    return f"python {p.python_version()}, opencc {opencc.__version__}"


if __name__ == "__main__":
    main()
