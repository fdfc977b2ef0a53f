"""Guard pipeline: runs the spec's input or output stages on one text and returns one verdict.

Stages run in the spec's order; a mask rewrites the text the next stage sees, a block stops the
pipeline. A stage that raises (a model that cannot load, a check that times out) blocks, or lets the
text through where its `on_error` is "allow"; either way a note names the stage and the error class,
never the text. Findings carry entity, rule and offsets, never the matched characters.

    pipeline = GuardPipeline.from_spec(spec.guard)
    result = pipeline.run("我的身分證是 A123456789", stage="input")
    result.verdict, result.text  # "mask", "我的身分證是 [tw_national_id]"
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from twllm.guard.llama_guard import CATEGORIES
from twllm.guard.pii import PLACEHOLDERS_ZH, PiiPolicy
from twllm.spec.schema import GuardSpec

if TYPE_CHECKING:
    from twllm.zh_tw.structured import JsonFormat

Stage = Literal["input", "output"]
Verdict = Literal["allow", "mask", "block"]

CATEGORIES_ZH: Mapping[str, str] = {
    "S1": "暴力犯罪",
    "S2": "非暴力犯罪",
    "S3": "性相關犯罪",
    "S4": "兒童性剝削",
    "S5": "誹謗",
    "S6": "專業建議",
    "S7": "隱私",
    "S8": "智慧財產權",
    "S9": "無差別殺傷性武器",
    "S10": "仇恨",
    "S11": "自殺與自我傷害",
    "S12": "性內容",
    "S13": "選舉",
    "S14": "程式碼直譯器濫用",
}
"""Traditional Chinese names of the Llama Guard categories, for block messages."""

PROMPT_INJECTION = "prompt_injection"
"""The category a Prompt Guard block carries."""


@dataclass(frozen=True)
class GuardResult:
    """What the pipeline decided about one text."""

    verdict: Verdict
    categories: list[str]
    """Llama Guard categories (S1-S14), "prompt_injection", or the masked/blocked PII entities."""
    text: str
    """The text after every mask (unchanged when nothing was masked)."""
    findings: list[dict[str, Any]] = field(default_factory=list)
    """PII findings: entity, rule, start, end (offsets in the stage's input) - never the raw text."""
    notes: list[str] = field(default_factory=list)
    latency_ms: dict[str, float] = field(default_factory=dict)
    message: str | None = None
    """For a block: a message for people, in Traditional Chinese then English."""

    @property
    def blocked(self) -> bool:
        return self.verdict == "block"

    def to_dict(self) -> dict[str, Any]:
        return {
            "verdict": self.verdict,
            "categories": list(self.categories),
            "text": self.text,
            "message": self.message,
            "findings": list(self.findings),
            "notes": list(self.notes),
            "latency_ms": dict(self.latency_ms),
        }


@dataclass
class _Outcome:
    """One stage's contribution."""

    text: str
    verdict: Verdict = "allow"
    categories: list[str] = field(default_factory=list)
    findings: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    message: str | None = None


# ---------------------------------------------------------------------------------------------
# Messages for people: Traditional Chinese first, then English.
def _subject(stage: Stage) -> tuple[str, str]:
    return ("請求", "request") if stage == "input" else ("回應", "response")


def category_message(categories: Iterable[str], stage: Stage) -> str:
    zh_what, en_what = _subject(stage)
    cats = list(categories)
    if cats:
        zh = "、".join(f"{c} {CATEGORIES_ZH.get(c, c)}" for c in cats)
        en = ", ".join(f"{c} {CATEGORIES.get(c, c)}" for c in cats)
    else:  # an unparseable verdict counts as unsafe
        zh, en = "無法判讀的安全判定", "the safety verdict could not be read"
    return f"此{zh_what}含有不允許的內容（{zh}）。 This {en_what} was blocked: {en}."


def pii_message(entities: Iterable[str], stage: Stage) -> str:
    zh_what, en_what = _subject(stage)
    names = list(dict.fromkeys(entities))
    zh = "、".join(PLACEHOLDERS_ZH.get(e, e).strip("[]") for e in names)
    return (
        f"{zh_what}含有個人資料（{zh}），已拒絕。 Blocked: the {en_what} contains personal data ({', '.join(names)})."
    )


def injection_message() -> str:
    return "此請求疑似提示詞注入攻擊，已拒絕。 This request was blocked: suspected prompt injection."


def failure_message(stage_name: str, stage: Stage) -> str:
    zh_what, en_what = _subject(stage)
    return (
        f"安全檢查（{stage_name}）無法完成，已拒絕此{zh_what}。 "
        f"This {en_what} was blocked: the safety check ({stage_name}) failed."
    )


# ---------------------------------------------------------------------------------------------
class ModelCache:
    """Guard models loaded once per process, whichever pipeline asks first."""

    def __init__(self) -> None:
        self._models: dict[tuple, Any] = {}
        self._lock = threading.Lock()

    def get(self, key: tuple, load: Callable[[], Any]) -> Any:
        with self._lock:
            if key not in self._models:
                self._models[key] = load()
            return self._models[key]


class GuardPipeline:
    """The configured stages, with the guard models loaded on first use (then kept)."""

    def __init__(
        self,
        spec: GuardSpec,
        *,
        model_paths: Mapping[str, str] | None = None,
        models: Mapping[str, Any] | None = None,
        remote: Mapping[str, Any] | None = None,
        cache: ModelCache | None = None,
    ) -> None:
        """``model_paths``: where to load a guard model from, keyed by stage ("llama_guard",
        "prompt_guard") or by the spec's model name; wins over the registry.
        ``models``: already loaded guard objects keyed by stage (LlamaGuard- / PromptGuard-like).
        ``remote``: guard models served by this deployment's engines (``policy.RemoteGuard`` by
        served name); a llama_guard model named there is asked over HTTP instead of loaded.
        ``cache``: loaded models shared between pipelines (one per policy in the gateway)."""
        self.spec = spec
        self.model_paths = dict(model_paths or {})
        self.remote = dict(remote or {})
        self.pii = PiiPolicy(**spec.pii.model_dump())
        self._models: dict[str, Any] = dict(models or {})
        self._cache = cache if cache is not None else ModelCache()
        self._load_lock = threading.Lock()
        self._executor: ThreadPoolExecutor | None = None
        self._stages: dict[str, Callable[[str, Stage, list | None], _Outcome]] = {
            "pii": self._pii,
            "llama_guard": self._llama_guard,
            "prompt_guard": self._prompt_guard,
            "zh_tw": self._zh_tw,
        }

    @classmethod
    def from_spec(cls, guard_spec: GuardSpec, *, model_paths: Mapping[str, str] | None = None) -> GuardPipeline:
        return cls(guard_spec, model_paths=model_paths)

    def stages(self, stage: Stage) -> list[str]:
        if stage not in ("input", "output"):
            raise ValueError(f"stage must be 'input' or 'output', not {stage!r}")
        return list(self.spec.input if stage == "input" else self.spec.output)

    def run(
        self,
        text: str,
        stage: Stage = "input",
        messages: list[Mapping[str, Any]] | None = None,
        only: Iterable[str] | None = None,
        structure: JsonFormat | None = None,
    ) -> GuardResult:
        """Run the stages of ``stage`` on ``text``. ``messages``: the conversation (for Llama Guard:
        context of an input check, the question of an output check). ``only``: run just these of
        the configured stages. ``structure``: the request asked for JSON (``zh_tw.structured``
        says what the zh_tw stage may change in it)."""
        names = self.stages(stage)
        if only is not None:
            wanted = set(only)
            names = [n for n in names if n in wanted]
        verdict: Verdict = "allow"
        categories: list[str] = []
        findings: list[dict[str, Any]] = []
        notes: list[str] = []
        latency: dict[str, float] = {}
        message = None
        for name in names:
            start = time.perf_counter()
            try:
                if name == "zh_tw":
                    outcome = self._zh_tw(text, stage, messages, structure)
                else:
                    outcome = self._stages[name](text, stage, messages)
            except Exception as exc:  # noqa: BLE001 - any guard failure goes through the failure policy
                outcome = self._failed(name, stage, text, exc)
            latency[name] = (time.perf_counter() - start) * 1000
            text = outcome.text
            categories += [c for c in outcome.categories if c not in categories]
            findings += outcome.findings
            notes += outcome.notes
            if outcome.verdict == "block":
                verdict, message = "block", outcome.message
                break
            if outcome.verdict == "mask":
                verdict = "mask"
        return GuardResult(verdict, categories, text, findings, notes, latency, message)

    def _failed(self, name: str, stage: Stage, text: str, exc: BaseException) -> _Outcome:
        policy = getattr(getattr(self.spec, name, None), "on_error", "block")  # PII: no on_error
        note = f"{name}: {type(exc).__name__} (on_error: {policy})"
        if policy == "allow":
            return _Outcome(text, notes=[note])
        return _Outcome(text, "block", notes=[note], message=failure_message(name, stage))

    # --- stages ------------------------------------------------------------------------------
    def _pii(self, text: str, stage: Stage, messages: list | None) -> _Outcome:
        result = self.pii.apply(text)
        findings = [{"entity": f.entity, "rule": f.rule, "start": f.start, "end": f.end} for f in result.findings]
        acted = [f.entity for f in result.findings if self.pii.action_for(f.entity) != "log"]
        categories = list(dict.fromkeys(acted))
        if result.blocked:
            blocking = [f.entity for f in result.findings if self.pii.action_for(f.entity) == "block"]
            return _Outcome(result.text, "block", categories, findings, message=pii_message(blocking, stage))
        return _Outcome(result.text, "mask" if result.masked else "allow", categories, findings)

    def _llama_guard(self, text: str, stage: Stage, messages: list | None) -> _Outcome:
        guard = self._model("llama_guard")
        cfg = self.spec.llama_guard
        excluded = list(cfg.excluded_categories)
        if stage == "input":
            conversation = _with_last_user(messages, text)
            call = lambda: guard.check_input(conversation, excluded)  # noqa: E731
        else:
            conversation = list(messages or []) or [{"role": "user", "content": ""}]
            call = lambda: guard.check_output(conversation, text, excluded)  # noqa: E731
        check = self._with_timeout(call, cfg.timeout_s)
        if check.safe:
            return _Outcome(text)
        cats = list(check.categories)
        return _Outcome(text, "block", cats, message=category_message(cats, stage))

    def _prompt_guard(self, text: str, stage: Stage, messages: list | None) -> _Outcome:
        screen = self._model("prompt_guard").screen(text)
        if not screen.malicious:
            return _Outcome(text)
        return _Outcome(text, "block", [PROMPT_INJECTION], message=injection_message())

    def _zh_tw(self, text: str, stage: Stage, messages: list | None, structure: JsonFormat | None = None) -> _Outcome:
        from twllm.zh_tw import normalize
        from twllm.zh_tw.structured import normalize_json

        if structure is None:
            converted = normalize(text)
        elif self.spec.zh_tw.structured == "values":
            converted = normalize_json(text, structure)
        else:
            converted = text
        if converted == text:
            return _Outcome(text)
        return _Outcome(converted, "mask", findings=[{"entity": "zh_hans", "rule": "opencc_s2twp"}])

    # --- models ------------------------------------------------------------------------------
    def model_location(self, name: str) -> str:
        """Where the model of stage ``name`` loads from: model_paths, a local folder, or the
        registry's hf_repo (RegistryError for an unknown id)."""
        model = getattr(self.spec, name).model
        for key in (name, model):
            if key in self.model_paths:
                return self.model_paths[key]
        if Path(model).expanduser().exists():
            return str(Path(model).expanduser())
        from twllm.model_registry import load_registry

        return load_registry().get(model).hf_repo

    def _model(self, name: str) -> Any:
        with self._load_lock:
            if name not in self._models:
                self._models[name] = self._load(name)
            return self._models[name]

    def _load(self, name: str) -> Any:
        served = getattr(self.spec, name).model
        if name == "llama_guard" and served in self.remote:
            from twllm.guard.remote import RemoteLlamaGuard

            target = self.remote[served]
            return self._cache.get(("remote", served), lambda: RemoteLlamaGuard.from_target(target))
        location = self.model_location(name)
        if name == "llama_guard":
            from twllm.guard.llama_guard import LlamaGuard

            device = self.spec.llama_guard.device
            return self._cache.get(("llama_guard", location, device), lambda: LlamaGuard(location, device=device))
        from twllm.guard.prompt_guard import PromptGuard

        threshold = self.spec.prompt_guard.threshold
        return self._cache.get(
            ("prompt_guard", location, threshold), lambda: PromptGuard(location, threshold=threshold)
        )

    def _with_timeout(self, call: Callable[[], Any], timeout_s: float) -> Any:
        """Run ``call`` for at most ``timeout_s`` (TimeoutError after; the check itself finishes in
        its thread, since a forward pass cannot be interrupted)."""
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=4, thread_name_prefix="twllm-guard")
        try:
            return self._executor.submit(call).result(timeout=timeout_s)
        except FutureTimeout:
            raise TimeoutError(f"the guard check took longer than {timeout_s} s") from None


def _with_last_user(messages: list[Mapping[str, Any]] | None, text: str) -> list[dict[str, Any]]:
    """The conversation with its last user turn replaced by ``text`` (what earlier stages left)."""
    turns = [dict(m) for m in messages or []]
    for turn in reversed(turns):
        if turn.get("role") == "user":
            turn["content"] = text
            return turns
    return turns + [{"role": "user", "content": text}]
