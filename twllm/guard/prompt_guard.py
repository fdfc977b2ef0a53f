"""Prompt-injection screening with a Prompt Guard style sequence classifier and a threshold.

Prompt Guard 2 (and any AutoModelForSequenceClassification labelled like it) reads up to 512
tokens and gives each label a logit; the score of a text is the probability of "not BENIGN"
(MALICIOUS for Prompt Guard 2; INJECTION + JAILBREAK for Prompt Guard 1). A text longer than one
window is cut into overlapping windows, all scored in batches, and the text's score is the
highest window's: an injection hidden at the end of a long document still counts.

Special tokens written in the text ("[SEP]", "<s>"...) are read as plain text, so a text cannot
end its window early. torch and transformers come with the ``guard`` extra.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from twllm.errors import RuntimeFailure
from twllm.guard.llama_guard import import_torch_stack, resolve_device, resolve_dtype


@dataclass(frozen=True)
class Screen:
    """The result of screening one text: the highest window score against the threshold."""

    malicious: bool
    score: float
    latency_ms: float
    windows: int


def benign_index(id2label: dict[int, str]) -> int:
    """The index of the BENIGN label; a model without one must have two labels, the first benign."""
    for index, label in id2label.items():
        if str(label).upper() == "BENIGN":
            return int(index)
    if len(id2label) == 2:
        return 0
    raise ValueError(f"cannot tell the benign label among {sorted(id2label.values())}")


class PromptGuard:
    """A Prompt Guard style classifier loaded in this process; thread-safe (one lock)."""

    def __init__(
        self,
        model: str | Path,
        *,
        threshold: float = 0.5,
        device: str = "auto",
        dtype: Any = "auto",
        window: int = 512,
        overlap: int = 64,
        batch_size: int = 8,
    ) -> None:
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"threshold must lie in [0, 1], not {threshold}")
        if not 0 <= overlap < window // 2:
            raise ValueError(f"overlap must lie in [0, window / 2), not {overlap}")
        torch, transformers = import_torch_stack()
        self.threshold = threshold
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.overlap = overlap
        self.batch_size = batch_size
        try:
            self.tokenizer = transformers.AutoTokenizer.from_pretrained(str(model))
            self.model = transformers.AutoModelForSequenceClassification.from_pretrained(str(model), dtype=self.dtype)
        except OSError as exc:
            raise RuntimeFailure(
                f"cannot load the Prompt Guard model {model}: {exc}",
                hint="give a folder saved with save_pretrained, or a hub id when the hub is reachable",
            ) from exc
        self.model.to(self.device).eval()
        limit = getattr(self.model.config, "max_position_embeddings", window) or window
        self.window = min(window, limit)
        self.benign = benign_index(dict(self.model.config.id2label))
        self._torch = torch
        self._lock = threading.Lock()

    def windows(self, text: str) -> dict[str, Any]:
        """The tokenized windows of ``text`` (special tokens included), as padded tensors."""
        encoded = self.tokenizer(
            text,
            truncation=True,
            max_length=self.window,
            stride=self.overlap,
            return_overflowing_tokens=True,
            padding=True,
            return_tensors="pt",
            split_special_tokens=True,
        )
        encoded.pop("overflow_to_sample_mapping", None)
        return dict(encoded)

    def screen(self, text: str) -> Screen:
        """Score ``text``; malicious when the score reaches the threshold."""
        start = time.perf_counter()
        inputs = self.windows(text)
        count = int(inputs["input_ids"].shape[0])
        scores = []
        with self._lock, self._torch.inference_mode():
            for first in range(0, count, self.batch_size):
                batch = {k: v[first : first + self.batch_size].to(self.device) for k, v in inputs.items()}
                probabilities = self.model(**batch).logits.float().softmax(dim=-1)
                scores.append(1.0 - probabilities[:, self.benign])
        score = float(self._torch.cat(scores).max())
        return Screen(score >= self.threshold, score, (time.perf_counter() - start) * 1000, count)
