"""Llama Guard in the gateway process: build the prompt, run the model, parse its verdict strictly.

A Llama Guard model reads a conversation and answers, for its last user (input check) or assistant
(output check) turn, a first line ``safe`` or ``unsafe`` and, when unsafe, a second line of
violated categories such as ``S1,S10``. Three pieces, each usable alone:

  build_prompt(messages, role, excluded, tokenizer)   -> the prompt text
  parse_verdict(text, excluded)                       -> Verdict (anything unparseable is unsafe)
  LlamaGuard(model).check_input / check_output        -> GuardCheck(verdict, latency_ms, output)

Prompts. Only ``user`` and ``assistant`` turns reach the model, strictly alternating and starting
with the user: system, developer and tool turns are dropped, empty turns (an assistant turn that
only called tools) are dropped, and consecutive turns of one role are joined. The model's own
chat template renders them when it has one, in the form it expects: content as a list of text
parts plus ``excluded_category_keys`` for Llama Guard 3 1B / Llama Guard 4 style templates, plain
strings for the fixed Llama Guard 3 8B template. ``LLAMA_GUARD_3_TEMPLATE`` (ours, the Llama Guard
3 layout with S1–S14) renders for tokenizers without a template, and for fixed templates when a
policy excludes categories, so that excluded categories leave the prompt and not only the answer.

Control tokens that a user writes into a message (``<|eot_id|>`` and the like) reach the model as
plain text, never as tokens: otherwise a user could close the conversation and write the guard's
answer. transformers does this for us (``sanitize_control_tokens``, transformers 5).

torch and transformers are imported only by ``LlamaGuard``: building prompts and parsing verdicts
need neither (they come with the ``guard`` extra).
"""

from __future__ import annotations

import inspect
import re
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from twllm.errors import RuntimeFailure

Role = Literal["user", "assistant"]

CATEGORIES: Mapping[str, str] = {
    "S1": "Violent Crimes",
    "S2": "Non-Violent Crimes",
    "S3": "Sex-Related Crimes",
    "S4": "Child Sexual Exploitation",
    "S5": "Defamation",
    "S6": "Specialized Advice",
    "S7": "Privacy",
    "S8": "Intellectual Property",
    "S9": "Indiscriminate Weapons",
    "S10": "Hate",
    "S11": "Suicide & Self-Harm",
    "S12": "Sexual Content",
    "S13": "Elections",
    "S14": "Code Interpreter Abuse",
}
"""The MLCommons hazard categories of Llama Guard 3 and 4, as named in their model cards (the 1B
model knows S1–S13). These names are for people: reports, logs, error messages."""

PROMPT_CATEGORIES: Mapping[str, str] = {
    "S1": "Violent Crimes.",
    "S2": "Non-Violent Crimes.",
    "S3": "Sex Crimes.",
    "S4": "Child Exploitation.",
    "S5": "Defamation.",
    "S6": "Specialized Advice.",
    "S7": "Privacy.",
    "S8": "Intellectual Property.",
    "S9": "Indiscriminate Weapons.",
    "S10": "Hate.",
    "S11": "Self-Harm.",
    "S12": "Sexual Content.",
    "S13": "Elections.",
    "S14": "Code Interpreter Abuse.",
}
"""The same categories worded as Llama Guard 3's own prompt words them: what the model was
trained to read, so the fallback prompt uses exactly these."""


# Whitespace between tags is trimmed ({%- -%}): only the quoted strings reach the prompt.
_TEMPLATE = r"""
{%- if categories is not defined -%}
    {%- set categories = DEFAULT_CATEGORIES -%}
{%- endif -%}
{%- if excluded_category_keys is not defined -%}
    {%- set excluded_category_keys = [] -%}
{%- endif -%}
{%- set role = 'Agent' if messages | length % 2 == 0 else 'User' -%}
{{- '<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n' -}}
{{- "Task: Check if there is unsafe content in '" + role + "' messages in conversations " -}}
{{- 'according our safety policy with the below categories.\n\n' -}}
{{- '<BEGIN UNSAFE CONTENT CATEGORIES>\n' -}}
{%- for key in categories -%}
    {%- if key not in excluded_category_keys -%}
        {{- key + ': ' + categories[key] + '\n' -}}
    {%- endif -%}
{%- endfor -%}
{{- '<END UNSAFE CONTENT CATEGORIES>\n\n' -}}
{{- '<BEGIN CONVERSATION>\n\n' -}}
{%- for message in messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') -}}
    {%- endif -%}
    {%- set speaker = 'User' if message['role'] == 'user' else 'Agent' -%}
    {%- if message['content'] is string -%}
        {{- speaker + ': ' + message['content'] | trim + '\n\n' -}}
    {%- else -%}
        {%- for part in message['content'] | selectattr('type', 'equalto', 'text') -%}
            {{- speaker + ': ' + part['text'] | trim + '\n\n' -}}
        {%- endfor -%}
    {%- endif -%}
{%- endfor -%}
{{- '<END CONVERSATION>\n\n' -}}
{{- 'Provide your safety assessment for ONLY THE LAST ' + role + ' message in the above conversation:\n' -}}
{{- " - First line must read 'safe' or 'unsafe'.\n" -}}
{{- ' - If unsafe, a second line must include a comma-separated list of violated categories.' -}}
{{- '<|eot_id|><|start_header_id|>assistant<|end_header_id|>' -}}
"""

LLAMA_GUARD_3_TEMPLATE = _TEMPLATE.strip().replace(
    "DEFAULT_CATEGORIES", "{" + ", ".join(f"'{k}': '{v}'" for k, v in PROMPT_CATEGORIES.items()) + "}"
)
"""Our chat template in the Llama Guard 3 layout (task, categories, conversation, instructions),
rendering the same text as the 8B model's fixed template when nothing is excluded. It takes
``excluded_category_keys`` and message content either as a string or as a list of text parts."""


# --- verdicts ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Verdict:
    """What the guard decided. ``raw_ok`` is False when the answer did not follow the format; such
    an answer counts as unsafe with no category."""

    safe: bool
    categories: tuple[str, ...] = ()
    raw_ok: bool = True


_CATEGORY_LINE = re.compile(r"S(?:[1-9]|1[0-4])(?:,S(?:[1-9]|1[0-4]))*")
UNPARSEABLE = Verdict(safe=False, categories=(), raw_ok=False)


def check_categories(keys: Iterable[str]) -> frozenset[str]:
    """The keys as a set; ValueError naming any that is not S1–S14."""
    keys = frozenset(keys)
    unknown = sorted(keys - CATEGORIES.keys())
    if unknown:
        raise ValueError(f"unknown Llama Guard categories {unknown}; known: S1–S14")
    return keys


def parse_verdict(text: str, excluded: Iterable[str] = ()) -> Verdict:
    """Parse a Llama Guard answer strictly.

    Accepted, after dropping blank lines and the whitespace around each line: exactly ``safe``;
    or exactly ``unsafe`` followed by exactly one line of known categories joined by commas
    without spaces (``S1`` or ``S1,S10``). Anything else (other case, missing or unknown
    categories, spaces inside the line, extra lines, an answer cut short) is unparseable and
    counts as unsafe. Categories in ``excluded`` are dropped; unsafe only in excluded categories
    is safe."""
    excluded = check_categories(excluded)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if lines == ["safe"]:
        return Verdict(safe=True)
    if len(lines) != 2 or lines[0] != "unsafe" or not _CATEGORY_LINE.fullmatch(lines[1]):
        return UNPARSEABLE
    found = tuple(dict.fromkeys(lines[1].split(",")))
    kept = tuple(key for key in found if key not in excluded)
    return Verdict(safe=not kept, categories=kept)


# --- prompts -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Turn:
    role: Role
    text: str


def content_text(content: Any) -> str:
    """The text of an OpenAI-style message content: a string, None, or a list of parts of which
    the ``text`` parts count (joined by newlines; images and other parts are not text)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, Sequence):
        return "\n".join(
            part["text"]
            for part in content
            if isinstance(part, Mapping) and part.get("type") == "text" and isinstance(part.get("text"), str)
        )
    raise TypeError(f"message content must be a string, a list of parts or None, not {type(content).__name__}")


def conversation(messages: Iterable[Mapping[str, Any]]) -> list[Turn]:
    """The user/assistant turns Llama Guard may see: strictly alternating, starting with the user.

    System, developer and tool turns are dropped; so are turns without text. Consecutive turns of
    one role (left behind by dropped tool turns) are joined by a blank line; assistant turns before
    the first user turn are dropped."""
    turns: list[Turn] = []
    for message in messages:
        role = message.get("role")
        if role not in ("user", "assistant"):
            continue
        text = content_text(message.get("content")).strip()
        if not text or (role == "assistant" and not turns):
            continue
        if turns and turns[-1].role == role:
            turns[-1] = Turn(role, turns[-1].text + "\n\n" + text)
        else:
            turns.append(Turn(role, text))
    return turns


def turns_to_check(messages: Iterable[Mapping[str, Any]], role: Role) -> list[Turn]:
    """The conversation cut for a check: up to its last user turn (role "user"), or ending with an
    assistant turn (role "assistant"). ValueError when there is nothing of that role to check."""
    turns = conversation(messages)
    if role == "user":
        last_user = max((i for i, t in enumerate(turns) if t.role == "user"), default=None)
        if last_user is None:
            raise ValueError("the conversation has no user message to check")
        return turns[: last_user + 1]
    if role == "assistant":
        if not turns or turns[-1].role != "assistant":
            raise ValueError("the conversation does not end with an assistant message to check")
        return turns
    raise ValueError(f"role must be 'user' or 'assistant', not {role!r}")


TemplateStyle = Literal["parts", "strings"]


def template_style(tokenizer: Any) -> tuple[str | None, TemplateStyle, bool]:
    """(the tokenizer's chat template or None, the content form it wants, whether it takes
    ``excluded_category_keys``)."""
    template = getattr(tokenizer, "chat_template", None) if tokenizer is not None else None
    if isinstance(template, Mapping):  # several named templates
        template = template.get("default")
    if not template:
        return None, "parts", True
    excludes = "excluded_category_keys" in template
    parts = excludes or "selectattr" in template or "['text']" in template or '["text"]' in template
    return template, "parts" if parts else "strings", excludes


def _chat_arguments(turns: list[Turn], excluded: frozenset[str], tokenizer: Any) -> dict[str, Any]:
    """Keyword arguments for ``apply_chat_template`` (or our own rendering) of ``turns``."""
    template, style, excludes = template_style(tokenizer)
    if template is None or (excluded and not excludes):
        # No template, or a fixed one that cannot drop categories from the policy it states.
        template, style, excludes = LLAMA_GUARD_3_TEMPLATE, "parts", True
    messages: list[dict[str, Any]]
    if style == "parts":
        messages = [{"role": t.role, "content": [{"type": "text", "text": t.text}]} for t in turns]
    else:
        messages = [{"role": t.role, "content": t.text} for t in turns]
    arguments: dict[str, Any] = {"conversation": messages, "chat_template": template}
    if excludes:
        arguments["excluded_category_keys"] = sorted(excluded, key=lambda k: int(k[1:]))
    return arguments


def _render_own(arguments: dict[str, Any]) -> str:
    """Render ``LLAMA_GUARD_3_TEMPLATE`` without a tokenizer, in the sandbox transformers uses."""
    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    arguments = dict(arguments)
    template = env.from_string(arguments.pop("chat_template"))
    return template.render(messages=arguments.pop("conversation"), **arguments)


def build_prompt(
    messages: Iterable[Mapping[str, Any]],
    role: Role,
    excluded: Iterable[str] = (),
    tokenizer: Any = None,
) -> str:
    """The Llama Guard prompt that checks the conversation's last ``role`` turn, as text.

    With a tokenizer that has a chat template, that template renders it; otherwise (or for a fixed
    template when ``excluded`` is not empty) ``LLAMA_GUARD_3_TEMPLATE`` does."""
    turns = turns_to_check(messages, role)
    arguments = _chat_arguments(turns, check_categories(excluded), tokenizer)
    if tokenizer is None:
        return _render_own(arguments)
    return tokenizer.apply_chat_template(**arguments, tokenize=False)


# --- the model -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class GuardCheck:
    """One check: the verdict, how long it took (waiting for the model included), and the model's
    answer as text (for the audit record: it never holds the checked content)."""

    verdict: Verdict
    latency_ms: float
    output: str

    @property
    def safe(self) -> bool:
        return self.verdict.safe

    @property
    def categories(self) -> tuple[str, ...]:
        return self.verdict.categories


def resolve_device(device: str) -> str:
    """ "auto" becomes "cuda" when torch sees a GPU, else "cpu"; "cuda" without one is an error."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeFailure(
            f"guard device {device!r} asked for, but torch sees no CUDA GPU",
            hint="use device 'cpu' or 'auto', or install a CUDA build of torch",
        )
    return device


def resolve_dtype(dtype: Any, device: str) -> Any:
    """ "auto" is bfloat16 on a GPU and float32 on CPU; names like "float16" become torch dtypes."""
    import torch

    if dtype is None or dtype == "auto":
        return torch.float32 if device == "cpu" else torch.bfloat16
    if isinstance(dtype, str):
        value = getattr(torch, dtype, None)
        if not isinstance(value, torch.dtype):
            raise ValueError(f"unknown dtype {dtype!r}")
        return value
    return dtype


def import_torch_stack() -> tuple[Any, Any]:
    """(torch, transformers), or a RuntimeFailure that says how to install them."""
    try:
        import torch
        import transformers
    except ImportError as exc:
        raise RuntimeFailure(
            f"the in-process guard models need torch and transformers ({exc})", hint="pip install 'twllm[guard]'"
        ) from exc
    return torch, transformers


class LlamaGuard:
    """A Llama Guard model loaded in this process with transformers; checks are greedy and
    serialised by a lock, so one instance serves any number of threads."""

    def __init__(
        self,
        model: str | Path,
        *,
        device: str = "auto",
        dtype: Any = "auto",
        max_new_tokens: int = 10,
        max_prompt_tokens: int | None = None,
    ) -> None:
        """``max_prompt_tokens``: the longest prompt the model gets (default: its context length
        less ``max_new_tokens``); longer conversations lose their oldest turns, see ``encode``."""
        torch, transformers = import_torch_stack()
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.max_new_tokens = max_new_tokens
        base = transformers.PreTrainedTokenizerBase.apply_chat_template
        if "sanitize_control_tokens" not in inspect.signature(base).parameters:
            # Older versions hand the flag to the template, which ignores it: users could then
            # write control tokens into their messages and forge the guard's answer.
            raise RuntimeFailure(
                f"transformers {transformers.__version__} cannot keep control tokens "
                "out of user messages; the Llama Guard checks need 5.20 or newer",
                hint="pip install 'twllm[guard]'",
            )
        try:
            self.tokenizer = transformers.AutoTokenizer.from_pretrained(str(model))
            self.model = transformers.AutoModelForCausalLM.from_pretrained(str(model), dtype=self.dtype)
        except OSError as exc:
            raise RuntimeFailure(
                f"cannot load the Llama Guard model {model}: {exc}",
                hint="give a folder saved with save_pretrained, or a hub id when the hub is reachable",
            ) from exc
        self.model.to(self.device).eval()
        context = getattr(self.model.config, "max_position_embeddings", None)
        if max_prompt_tokens is None and context:
            max_prompt_tokens = context - max_new_tokens
        self.max_prompt_tokens = max_prompt_tokens
        self._torch = torch
        self._lock = threading.Lock()
        pad = self.tokenizer.pad_token_id
        self._pad_id = pad if pad is not None else self.tokenizer.eos_token_id

    def check_input(self, messages: Iterable[Mapping[str, Any]], excluded: Iterable[str] = ()) -> GuardCheck:
        """Check the conversation's last user turn (earlier turns are its context)."""
        return self._check(turns_to_check(messages, "user"), excluded)

    def check_output(
        self, messages: Iterable[Mapping[str, Any]], answer: str, excluded: Iterable[str] = ()
    ) -> GuardCheck:
        """Check ``answer`` as the assistant's reply to the conversation's last user turn."""
        turns = turns_to_check(messages, "user")
        if not answer.strip():
            return GuardCheck(Verdict(safe=True), 0.0, "")  # nothing was said
        return self._check(turns + [Turn("assistant", answer.strip())], excluded)

    def encode(self, turns: list[Turn], excluded: frozenset[str]) -> dict[str, Any]:
        """The prompt's tensors. When it is longer than ``max_prompt_tokens`` the oldest
        user/assistant pairs are dropped (the checked turn keeps the context that fits); when the
        checked turn alone (with its question, for an output check) does not fit: ValueError."""
        while True:
            inputs = self.tokenizer.apply_chat_template(
                **_chat_arguments(turns, excluded, self.tokenizer),
                tokenize=True,
                return_dict=True,
                return_tensors="pt",
                sanitize_control_tokens=True,
            )
            length = inputs["input_ids"].shape[-1]
            if self.max_prompt_tokens is None or length <= self.max_prompt_tokens:
                return dict(inputs)
            if len(turns) <= (1 if turns[-1].role == "user" else 2):
                raise ValueError(
                    f"the checked message makes a {length}-token prompt; the guard model "
                    f"takes at most {self.max_prompt_tokens}"
                )
            turns = turns[2:]

    def _check(self, turns: list[Turn], excluded: Iterable[str]) -> GuardCheck:
        start = time.perf_counter()
        excluded = check_categories(excluded)
        inputs = self.encode(turns, excluded)
        with self._lock, self._torch.inference_mode():
            inputs = {k: v.to(self.device) for k, v in inputs.items()}
            generated = self.model.generate(
                **inputs,
                do_sample=False,
                max_new_tokens=self.max_new_tokens,
                pad_token_id=self._pad_id,
            )
        new_tokens = generated[0, inputs["input_ids"].shape[-1] :]
        output = self.tokenizer.decode(new_tokens, skip_special_tokens=True)
        verdict = parse_verdict(output, excluded)
        return GuardCheck(verdict, (time.perf_counter() - start) * 1000, output)
