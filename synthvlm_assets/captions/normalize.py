"""Text normalisation applied before the rule filters (SPEC §1), and the exact-duplicate key.

Data-Juicer's `fix_unicode_mapper` then `punctuation_normalization_mapper`, in that order.
"""

from __future__ import annotations

import hashlib
import re

import ftfy

# Data-Juicer's punctuation_normalization_mapper table (SPEC §1), one code point at a time.
PUNCTUATION_MAP: dict[str, str] = {
    "，": ",", "。": ".", "、": ",", "„": '"', "”": '"', "“": '"', "«": '"', "»": '"',
    "１": '"', "」": '"', "「": '"', "《": '"', "》": '"', "´": "'", "∶": ":", "：": ":",
    "？": "?", "！": "!", "（": "(", "）": ")", "；": ";", "–": "-", "—": " - ", "．": ". ",
    "～": "~", "’": "'", "…": "...", "━": "-", "〈": "<", "〉": ">", "【": "[", "】": "]",
    "％": "%", "►": "-",
}  # fmt: skip
_PUNCTUATION_TABLE = str.maketrans(PUNCTUATION_MAP)

# Bumped whenever `normalize_caption` changes what it returns: dedup-key caches are keyed on it.
NORMALIZATION_VERSION = "ftfy6.3.1-nfc+dj-punct-v1"


# Printable ASCII, tab and newline, without '&' (HTML entities): text made only of these is returned
# unchanged by every ftfy fix (they all act on non-ASCII, control characters, \r or entities), so we
# skip the call. test_normalize checks this claim against ftfy itself.
_ASCII_NOOP = re.compile(r"[\t\n\x20-\x25\x27-\x7e]*")


def fix_unicode(text: str) -> str:
    """ftfy with its defaults and NFC, as Data-Juicer's fix_unicode_mapper calls it."""
    if text.isascii() and _ASCII_NOOP.fullmatch(text):
        return text
    return ftfy.fix_text(text, normalization="NFC")


def normalize_punctuation(text: str) -> str:
    return text.translate(_PUNCTUATION_TABLE)


def normalize_caption(text: str) -> str:
    """Unicode fixing, then punctuation normalisation: the text every filter sees and we keep."""
    return normalize_punctuation(fix_unicode(text))


def dedup_key(normalized_caption: str) -> bytes:
    """128-bit key of the normalised text (64 bits would collide in a 1B-caption pool)."""
    return hashlib.blake2b(normalized_caption.encode("utf-8", "surrogatepass"), digest_size=16).digest()
