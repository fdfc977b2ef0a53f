"""Build a Llama-3.1-8B-shaped model with random weights, locally (no download), for vLLM throughput runs.

    python benchmarks/gpu/build_random_llama.py --out /data/llama31-8b-random          # 8.03 B parameters, ~16 GB
    python benchmarks/gpu/build_random_llama.py --out /tmp/llama-tiny --tiny           # same code path, 2 layers

config.json has Llama-3.1-8B's published shape (hidden 4096, 32 layers, 32 query / 8 KV heads,
intermediate 14336, vocab 128256, RoPE theta 500000 with llama3 scaling, 131072 positions). The
tokenizer is twllm's demo byte-level BPE (trained on the spot, Llama-3 chat template) padded with
plain added tokens up to the model's vocabulary, so every id the random model samples decodes to
text (a streamed answer has one chunk per token, as with the real model). Weights are drawn per
tensor (normal, std 0.02, bfloat16, fixed seed) and written one layer per safetensors shard, so
memory stays at one layer, not 16 GB. The throughput of a random-weights model equals the real
model's for the same shape and output length (use ignore_eos: random weights stop at random).

Needs torch, transformers, tokenizers and safetensors (twllm's `guard` extra, or vLLM's environment).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

LLAMA31_8B = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "vocab_size": 128256,
    "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0,
    "hidden_act": "silu",
    "attention_bias": False,
    "mlp_bias": False,
    "rope_scaling": {
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
        "rope_type": "llama3",
    },
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "initializer_range": 0.02,
}
"""meta-llama/Llama-3.1-8B's config.json (shape fields), token ids set from our tokenizer."""
TINY = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "head_dim": 32,
    "vocab_size": 2048,
    "max_position_embeddings": 4096,
    "rope_scaling": None,
}
LLAMA31_8B_PARAMS = 8_030_261_248


def tensor_shapes(c: dict) -> dict[str, tuple[int, ...]]:
    """Every weight of a LlamaForCausalLM with config ``c``, in Hugging Face's names."""
    h, i, hd = c["hidden_size"], c["intermediate_size"], c["head_dim"]
    q, kv = c["num_attention_heads"] * hd, c["num_key_value_heads"] * hd
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (c["vocab_size"], h)}
    for n in range(c["num_hidden_layers"]):
        p = f"model.layers.{n}."
        shapes.update(
            {
                p + "self_attn.q_proj.weight": (q, h),
                p + "self_attn.k_proj.weight": (kv, h),
                p + "self_attn.v_proj.weight": (kv, h),
                p + "self_attn.o_proj.weight": (h, q),
                p + "mlp.gate_proj.weight": (i, h),
                p + "mlp.up_proj.weight": (i, h),
                p + "mlp.down_proj.weight": (h, i),
                p + "input_layernorm.weight": (h,),
                p + "post_attention_layernorm.weight": (h,),
            }
        )
    shapes["model.norm.weight"] = (h,)
    if not c["tie_word_embeddings"]:
        shapes["lm_head.weight"] = (c["vocab_size"], h)
    return shapes


def parameter_count(c: dict) -> int:
    total = 0
    for shape in tensor_shapes(c).values():
        n = 1
        for d in shape:
            n *= d
        total += n
    return total


def build_tokenizer(vocab_size: int):
    """twllm's demo tokenizer, padded with plain (non-special) added tokens to ``vocab_size``."""
    from tokenizers import AddedToken

    from twllm.demo.build_script import build_tokenizer as demo_tokenizer

    tok = demo_tokenizer()
    missing = vocab_size - len(tok)
    if missing < 0:
        raise ValueError(f"the tokenizer has {len(tok)} tokens, more than vocab_size {vocab_size}")
    tok.add_tokens([AddedToken(f"⟨{n}⟩", special=False, normalized=False) for n in range(missing)])
    tok.model_max_length = 131072
    return tok


def build(out: Path, tiny: bool, seed: int = 0, say=print) -> dict:
    import torch
    from safetensors.torch import save_file

    config = {**LLAMA31_8B, **(TINY if tiny else {})}
    tokenizer = build_tokenizer(config["vocab_size"])
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in ("<|begin_of_text|>", "<|eot_id|>", "<|end_of_text|>")}
    config.update(bos_token_id=ids["<|begin_of_text|>"], eos_token_id=[ids["<|eot_id|>"], ids["<|end_of_text|>"]])
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(out)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "generation_config.json").write_text(
        json.dumps({"bos_token_id": config["bos_token_id"], "eos_token_id": config["eos_token_id"]}) + "\n"
    )
    shapes = tensor_shapes(config)
    groups: dict[str, list[str]] = {}
    for name in shapes:  # one shard per layer; embeddings, norm and head in their own
        key = ".".join(name.split(".")[:3]) if name.startswith("model.layers.") else name
        groups.setdefault(key, []).append(name)
    gen = torch.Generator().manual_seed(seed)
    weight_map, started = {}, time.monotonic()
    for number, (key, names) in enumerate(groups.items(), 1):
        shard = f"model-{number:05d}-of-{len(groups):05d}.safetensors"
        tensors = {}
        for name in names:
            if name.endswith("norm.weight"):
                tensors[name] = torch.ones(shapes[name], dtype=torch.bfloat16)
            else:
                tensors[name] = (torch.randn(shapes[name], generator=gen) * 0.02).to(torch.bfloat16)
            weight_map[name] = shard
        save_file(tensors, str(out / shard), metadata={"format": "pt"})
        say(f"[{time.monotonic() - started:6.1f} s] {shard}: {key}")
    params = parameter_count(config)
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": params * 2}, "weight_map": weight_map}, indent=2) + "\n"
    )
    (out / "README.md").write_text(
        f"# Random-weights model with {'a tiny' if tiny else 'the Llama-3.1-8B'} shape\n\n"
        f"Built by benchmarks/gpu/build_random_llama.py (seed {seed}); {params:,} parameters; a benchmark "
        "fixture that answers gibberish, not a model.\n"
    )
    return {"params": params, "vocab": len(tokenizer), "shards": len(groups)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder to write the model into")
    parser.add_argument(
        "--tiny", action="store_true", help="2 layers, hidden 64: the same code path in seconds on a CPU"
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    info = build(args.out, args.tiny, args.seed)
    print(json.dumps(info))
    return 0


if __name__ == "__main__":
    sys.exit(main())
