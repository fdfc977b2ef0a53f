"""Per-check latency of a Llama-Guard-3-1B-sized guard model with random weights (for a GPU host).

Llama Guard 3 1B is gated on the model hub, and its answers do not matter for timing: the cost of
a check is one prefill of the prompt plus up to 10 greedy decode steps. This script builds a
LlamaForCausalLM with Llama Guard 3 1B's shape (16 layers, hidden 2048, 32 heads / 8 KV heads,
MLP 8192, vocabulary 128,256, tied embeddings; bfloat16 on a GPU) and random weights, saves it
with a byte-level BPE tokenizer trained on the spot and Llama Guard 3's prompt template, and
loads it back through ``twllm.guard.llama_guard.LlamaGuard`` — the class the gateway runs. Random
weights rarely emit the end-of-turn token, so every check decodes the full 10 tokens: an upper
bound for the real model's verdicts (3–6 tokens).

The conversation is padded until the prompt is ``--prompt-tokens`` long (default 450, about a
Llama Guard 3 prompt with its 14 categories and a two-sentence question, measured with the real
tokenizer's ~4 characters per token) so that prefill costs what it would.

    python benchmarks/gpu/guard_latency.py [--checks 100] [--device cuda] [--prompt-tokens 450]
    python benchmarks/gpu/guard_latency.py --device cpu --layers 2 --checks 3   # a quick CPU smoke run
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

LLAMA_GUARD_3_1B = {
    "hidden_size": 2048,
    "intermediate_size": 8192,
    "num_hidden_layers": 16,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 64,
    "vocab_size": 128256,
    "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": True,
    "rope_parameters": {
        "rope_type": "llama3",
        "rope_theta": 500000.0,
        "factor": 32.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    },
}
QUESTION = "請問臺北今天的天氣如何？下午需要帶傘嗎？"
FILLER = "我想再補充一些背景說明，讓你更清楚我的情況。"


def build(out: Path, layers: int | None, dtype: str) -> Path:
    import torch
    import transformers

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))  # the tests' model builders
    from tiny_guard_models import BOS, EOS, EOT, PAD, _byte_level_tokenizer

    tokenizer = _byte_level_tokenizer("炸彈")
    shape = dict(LLAMA_GUARD_3_1B)
    if layers is not None:
        shape["num_hidden_layers"] = layers
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in (BOS, EOS, EOT, PAD)}
    config = transformers.LlamaConfig(
        **shape, bos_token_id=ids[BOS], eos_token_id=[ids[EOT], ids[EOS]], pad_token_id=ids[PAD]
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).to(getattr(torch, dtype))
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checks", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--prompt-tokens", type=int, default=450)
    parser.add_argument("--layers", type=int, default=None, help="fewer layers, for a quick smoke run")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)

    import torch

    from twllm.guard.llama_guard import LlamaGuard, turns_to_check

    dtype = "bfloat16" if args.device.startswith("cuda") else "float32"
    with tempfile.TemporaryDirectory(prefix="twllm-guard-1b-") as folder:
        t0 = time.perf_counter()
        path = build(Path(folder) / "llama-guard-3-1b-random", args.layers, dtype)
        guard = LlamaGuard(path, device=args.device, dtype=dtype)
        load_s = time.perf_counter() - t0
        question = QUESTION
        while True:  # pad the question until the whole prompt has the wanted length
            messages = [{"role": "user", "content": question}]
            length = guard.encode(turns_to_check(messages, "user"), frozenset())["input_ids"].shape[-1]
            if length >= args.prompt_tokens:
                break
            question += FILLER
        answer = "今天臺北多雲時晴，午後山區可能有短暫雷陣雨，建議帶一把折疊傘。"
        for _ in range(args.warmup):
            guard.check_input(messages)
        rows = {}
        for name, check in (
            ("input", lambda: guard.check_input(messages)),
            ("output", lambda: guard.check_output(messages, answer)),
        ):
            latencies = []
            for _ in range(args.checks):
                if args.device.startswith("cuda"):
                    torch.cuda.synchronize()
                latencies.append(check().latency_ms)
            ordered = sorted(latencies)
            rows[name] = {
                "p50_ms": statistics.median(latencies),
                "p90_ms": ordered[max(0, round(0.9 * len(ordered)) - 1)],
                "mean_ms": statistics.fmean(latencies),
            }
    report = {
        "device": torch.cuda.get_device_name(0) if args.device.startswith("cuda") else "cpu",
        "dtype": dtype,
        "layers": args.layers or LLAMA_GUARD_3_1B["num_hidden_layers"],
        "prompt_tokens": int(length),
        "new_tokens": guard.max_new_tokens,
        "checks": args.checks,
        "build_and_load_s": round(load_s, 1),
        "checks_ms": rows,
        "command": " ".join(["python", "benchmarks/gpu/guard_latency.py", *sys.argv[1:]]),
    }
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(
            f"{report['device']} {dtype}, {report['layers']} layers, prompt {length} tokens, "
            f"{guard.max_new_tokens} new tokens, {args.checks} checks each"
        )
        for name, r in rows.items():
            print(f"  {name:<6} p50 {r['p50_ms']:7.1f} ms   p90 {r['p90_ms']:7.1f} ms   mean {r['mean_ms']:7.1f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
