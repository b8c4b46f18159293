"""The judge's prompt, built as token ids, and its verdicts.

The prompt is SPEC §1's instruction, a newline, then the caption, as the user turn of the model's chat
format with the assistant turn opened. The template around the caption is rendered once with a
sentinel in the caption's place and split there: the prefix and suffix are tokenised once with special
tokens parsed, the caption alone with special-token parsing off. A caption therefore can never inject a
control token or fake an assistant turn: "<|eot_id|>" inside a caption is plain text.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass

INSTRUCTION = (
    "Assume you are an expert in the field of AI image generation. Your goal is to select high-descriptive "
    "prompts that will enable the successful generation of images. I will provide you with a specific "
    "descriptive prompt, and your task is to evaluate it thoroughly. Consider the prompt's level of detail, "
    "its logical coherence, and the clarity with which it describes the desired image. It is essential to "
    "assess whether the prompt contains sufficient information to guide the diffusion model effectively, "
    "ensuring that it can produce an image that meets expectations. You should only respond with Yes or No."
)
SEPARATOR = "\n"  # between the instruction and the caption
_SENTINEL = "\u2063CAPTION\u2063"  # invisible separators: never produced by a template

YES, NO, PARSE_FAILURE = "yes", "no", "parse_failure"


class Unjudgeable(ValueError):
    """A caption the judge is not asked about (too long, not valid text); recorded with this message."""


@dataclass(frozen=True)
class JudgePrompt:
    """Token ids of the fixed text before and after the caption, and how to put a caption between."""

    prefix: tuple[int, ...]
    suffix: tuple[int, ...]
    tokenizer: object
    instruction: str = INSTRUCTION
    max_caption_tokens: int = 512

    @classmethod
    def build(cls, tokenizer, instruction: str = INSTRUCTION, max_caption_tokens: int = 512) -> JudgePrompt:
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError(
                f"the judge tokenizer {getattr(tokenizer, 'name_or_path', tokenizer)!r} has no chat template"
            )
        rendered = tokenizer.apply_chat_template(
            [{"role": "user", "content": instruction + SEPARATOR + _SENTINEL}],
            tokenize=False,
            add_generation_prompt=True,
        )
        if rendered.count(_SENTINEL) != 1:
            raise ValueError("the chat template does not place the user message verbatim")
        before, after = rendered.split(_SENTINEL)
        return cls(
            tuple(_ids(tokenizer, before, specials=True)),
            tuple(_ids(tokenizer, after, specials=True)),
            tokenizer,
            instruction,
            max_caption_tokens,
        )

    @property
    def version(self) -> str:
        """A hash of the token ids around the caption: instruction, chat template and tokenizer
        (a template that embeds today's date changes it)."""
        doc = json.dumps({"prefix": self.prefix, "suffix": self.suffix, "separator": SEPARATOR})
        return hashlib.sha256(doc.encode()).hexdigest()[:16]

    def caption_ids(self, caption: str) -> list[int]:
        # Chat templates trim the message content (Llama 3's does); the caption ends it, so its
        # trailing whitespace goes (its leading whitespace sits after the separator and stays).
        return _ids(self.tokenizer, caption.rstrip(), specials=False)

    def ids(self, caption: str) -> list[int]:
        """prefix + caption + suffix; Unjudgeable when the caption is too long or not valid text."""
        if not isinstance(caption, str):
            raise Unjudgeable(f"caption is {type(caption).__name__}, not text")
        if len(caption) > 16 * self.max_caption_tokens:  # cheap guard before tokenising a huge caption
            raise Unjudgeable(
                f"caption of {len(caption)} characters > 16 * max_caption_tokens={self.max_caption_tokens}"
            )
        try:
            caption.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise Unjudgeable(f"caption is not valid UTF-8 text ({exc.reason} at {exc.start})") from exc
        caption_ids = self.caption_ids(caption)
        if len(caption_ids) > self.max_caption_tokens:
            raise Unjudgeable(f"caption of {len(caption_ids)} tokens > max_caption_tokens={self.max_caption_tokens}")
        return [*self.prefix, *caption_ids, *self.suffix]

    def render(self, caption: str) -> str:
        """The whole prompt as text (what the assembly must equal when tokenised as a whole)."""
        return self.tokenizer.apply_chat_template(
            [{"role": "user", "content": self.instruction + SEPARATOR + caption}],
            tokenize=False,
            add_generation_prompt=True,
        )


def _ids(tokenizer, text: str, specials: bool) -> list[int]:
    # split_special_tokens=True makes "<|eot_id|>" in a caption ordinary text.
    return tokenizer(text, add_special_tokens=False, split_special_tokens=not specials)["input_ids"]


def answer_token_ids(tokenizer) -> dict[str, list[int]]:
    """The single-token spellings of Yes and No in this vocabulary ("Yes", " yes", "YES", ...)."""
    out: dict[str, list[int]] = {YES: [], NO: []}
    for word, verdict in (("Yes", YES), ("No", NO)):
        for form in {word, word.lower(), word.upper()}:
            for text in (form, " " + form):
                ids = tokenizer(text, add_special_tokens=False)["input_ids"]
                if len(ids) == 1 and ids[0] not in out[verdict]:
                    out[verdict].append(ids[0])
    if not out[YES] or not out[NO]:
        raise ValueError("the judge tokenizer has no single token for Yes or No")
    return out


def parse_verdict(token: str) -> str:
    """'Yes', ' yes', 'YES', 'Yes.' -> yes; 'No', 'No.' -> no; anything else -> parse_failure."""
    word = token.strip().rstrip(".!,").lower()
    return word if word in (YES, NO) else PARSE_FAILURE


def p_yes(yes_logprob: float, no_logprob: float) -> float | None:
    """P(Yes) / (P(Yes) + P(No)) from log-probabilities (None when neither was observed)."""
    if math.isinf(yes_logprob) and math.isinf(no_logprob):
        return None
    m = max(yes_logprob, no_logprob)
    y, n = math.exp(yes_logprob - m), math.exp(no_logprob - m)
    return y / (y + n)


def logsumexp(values: list[float]) -> float:
    values = [v for v in values if not math.isinf(v)]
    if not values:
        return -math.inf
    m = max(values)
    return m + math.log(sum(math.exp(v - m) for v in values))
