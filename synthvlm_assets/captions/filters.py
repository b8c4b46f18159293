"""The paper's Table-1 heuristic caption filters, with Data-Juicer 1.6's semantics (SPEC §1).

Each statistic is computed exactly as Data-Juicer's op of the same name computes it (same float
operations in the same order, so values agree bit for bit); a caption is kept by a filter when
`min <= stat <= max`, both ends inclusive.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from dataclasses import asdict, dataclass
from functools import cache
from importlib import resources
from typing import Any

_DATA = resources.files("synthvlm_assets.captions") / "data"


@cache
def special_characters() -> frozenset[str]:
    """The 1,618 code points Data-Juicer counts as special (NBSP is not one of them)."""
    doc = json.loads((_DATA / "special_characters.json").read_text("utf-8"))
    return frozenset(chr(int(h, 16)) for h in doc["codepoints_hex"])


@cache
def flagged_words(lang: str = "en") -> frozenset[str]:
    doc = json.loads((_DATA / "flagged_words.json").read_text("utf-8"))
    return frozenset(doc[lang])


@cache
def _special_delete_table() -> dict[int, None]:
    return dict.fromkeys(map(ord, special_characters()))


@cache
def _special_strip_chars() -> str:
    # str.strip(chars) strips any code point of `chars` from both ends, like Data-Juicer's strip().
    return "".join(sorted(special_characters()))


# Data-Juicer's split_on_whitespace(new_line=True, tab=True): single space, \n and \t only.
_WORD_SPLIT = re.compile(" |\n|\t")


def words(text: str) -> list[str]:
    """Data-Juicer's get_words_from_document + words_refinement(lower_case=True, strip_chars=SPECIAL).

    Lower-casing comes before stripping, as in Data-Juicer (lower() can change a word's length).
    """
    strip_chars, special = _special_strip_chars(), special_characters()
    out = []
    for piece in _WORD_SPLIT.split(text):
        if piece:
            word = piece.lower()
            if word[0] in special or word[-1] in special:  # strip() only ever removes from the ends
                word = word.strip(strip_chars)
            if word:
                out.append(word)
    return out


def alphanumeric_ratio(text: str) -> float:
    return sum(map(str.isalnum, text)) / len(text) if text else 0.0


def special_character_ratio(text: str) -> float:
    if not text:
        return 0.0
    return (len(text) - len(text.translate(_special_delete_table()))) / len(text)


def character_repetition_ratio(text: str, n: int = 10) -> float:
    counts = Counter([text[i : i + n] for i in range(len(text) - n + 1)])
    if not counts:
        return 0.0
    freqs = sorted(counts.values(), reverse=True)
    n_repeated = sum(1 for f in freqs if f > 1)
    k = min(int(math.sqrt(len(freqs))), n_repeated)
    return sum(freqs[:k]) / sum(freqs)


def word_repetition_ratio(word_list: list[str], n: int = 10) -> float:
    counts = Counter(" ".join(word_list[i : i + n]) for i in range(len(word_list) - n + 1))
    if not counts:
        return 0.0
    total = sum(counts.values())
    return sum(f for f in counts.values() if f > 1) / total


def flagged_word_ratio(word_list: list[str], lang: str = "en") -> float:
    if not word_list:
        return 0.0
    flagged = flagged_words(lang)
    return sum(1 for w in word_list if w in flagged) / len(word_list)


class PerplexityModel:
    """KenLM + SentencePiece perplexity exactly as Data-Juicer's perplexity_filter computes it.

    Model files are settings (Data-Juicer downloads its English `en.arpa.bin` / `en.sp.model`);
    the `kenlm` and `sentencepiece` packages are imported only when a model is configured.
    """

    def __init__(self, kenlm_model_path: str, sentencepiece_model_path: str) -> None:
        try:
            import kenlm  # type: ignore[import-not-found]
            import sentencepiece  # type: ignore[import-not-found]
        except ImportError as exc:  # pragma: no cover - depends on optional packages
            raise RuntimeError(
                "the perplexity filter is configured (kenlm_model_path is set) but the `kenlm` and "
                "`sentencepiece` packages are not installed; install them or unset kenlm_model_path"
            ) from exc
        for name, path in (
            ("kenlm_model_path", kenlm_model_path),
            ("sentencepiece_model_path", sentencepiece_model_path),
        ):
            try:
                with open(path, "rb"):
                    pass
            except OSError as exc:
                raise FileNotFoundError(f"perplexity filter: {name}={path!r} cannot be read: {exc}") from exc
        self._lm = kenlm.Model(kenlm_model_path)
        self._sp = sentencepiece.SentencePieceProcessor()
        self._sp.load(sentencepiece_model_path)

    def __call__(self, text: str) -> float:
        joined = " ".join(self._sp.encode_as_pieces(text))
        score, length = 0.0, 0
        for line in joined.splitlines():
            score += self._lm.score(line)
            length += len(line.split()) + 1
        return round(10.0 ** (-score / length), 1) if length else 0.0


@dataclass(frozen=True)
class RuleFilterSettings:
    """Table 1 of the paper's appendix; every bound is a setting. None means "no bound"."""

    alphanumeric_ratio_min: float = 0.60
    character_repetition_n: int = 10
    character_repetition_ratio_max: float = 0.09373663
    flagged_word_ratio_max: float = 0.0
    flagged_words_lang: str = "en"
    perplexity_max: float = 5500.0
    kenlm_model_path: str | None = None
    sentencepiece_model_path: str | None = None
    special_character_ratio_min: float = 0.16534802
    special_character_ratio_max: float = 0.42023757
    word_repetition_n: int = 10
    word_repetition_ratio_max: float = 0.03085751

    @property
    def perplexity_enabled(self) -> bool:
        return self.kenlm_model_path is not None

    def perplexity_model(self) -> PerplexityModel | None:
        """The KenLM model when one is configured (each curation process loads its own)."""
        if not self.perplexity_enabled:
            return None
        if not self.sentencepiece_model_path:
            raise ValueError(
                "kenlm_model_path is set but sentencepiece_model_path is not: the perplexity filter needs both"
            )
        return PerplexityModel(self.kenlm_model_path, self.sentencepiece_model_path)

    def bounds(self) -> dict[str, tuple[float, float | None]]:
        """Filter name -> (min, max) in the paper's Table-1 order; Data-Juicer's default min is 0."""
        out: dict[str, tuple[float, float | None]] = {
            "alphanumeric_ratio": (self.alphanumeric_ratio_min, None),
            "character_repetition_ratio": (0.0, self.character_repetition_ratio_max),
            "flagged_word_ratio": (0.0, self.flagged_word_ratio_max),
        }
        if self.perplexity_enabled:
            out["perplexity"] = (0.0, self.perplexity_max)
        out["special_character_ratio"] = (self.special_character_ratio_min, self.special_character_ratio_max)
        out["word_repetition_ratio"] = (0.0, self.word_repetition_ratio_max)
        return out

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


FILTER_NAMES: tuple[str, ...] = (
    "alphanumeric_ratio",
    "character_repetition_ratio",
    "flagged_word_ratio",
    "perplexity",
    "special_character_ratio",
    "word_repetition_ratio",
)


def caption_stats(
    text: str, settings: RuleFilterSettings, perplexity: PerplexityModel | None = None
) -> dict[str, float | None]:
    """All six statistics of one normalised caption (perplexity None when no model is configured)."""
    word_list = words(text)
    return {
        "alphanumeric_ratio": alphanumeric_ratio(text),
        "character_repetition_ratio": character_repetition_ratio(text, settings.character_repetition_n),
        "flagged_word_ratio": flagged_word_ratio(word_list, settings.flagged_words_lang),
        "perplexity": perplexity(text) if perplexity is not None else None,
        "special_character_ratio": special_character_ratio(text),
        "word_repetition_ratio": word_repetition_ratio(word_list, settings.word_repetition_n),
    }


def failed_filters(stats: dict[str, float | None], bounds: dict[str, tuple[float, float | None]]) -> list[str]:
    """Names of the filters whose keep rule `min <= stat <= max` fails, in Table-1 order."""
    failed = []
    for name, (lo, hi) in bounds.items():
        value = stats[name]
        if value is None or value < lo or (hi is not None and value > hi):
            failed.append(name)
    return failed
