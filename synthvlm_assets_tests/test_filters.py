"""The Table-1 rule filters against hand-computed values and Data-Juicer's documented behaviour."""

from __future__ import annotations

import json
import math
from collections import Counter

import pytest

from synthvlm_assets.captions.filters import (
    RuleFilterSettings,
    alphanumeric_ratio,
    caption_stats,
    character_repetition_ratio,
    failed_filters,
    flagged_word_ratio,
    flagged_words,
    special_character_ratio,
    special_characters,
    word_repetition_ratio,
    words,
)
from synthvlm_assets.captions.normalize import dedup_key, normalize_caption, normalize_punctuation


def test_data_files_are_the_specs():
    assert len(special_characters()) == 1618
    assert "\u00a0" not in special_characters()  # NBSP is not special
    assert {" ", "\t", "\n", "!", "0", "9", "…", "　"} <= special_characters()
    assert len(flagged_words("en")) == 429


@pytest.mark.parametrize(
    ("text", "expected"),
    [("", 0.0), ("ab1!", 0.75), ("é1", 1.0), ("  ", 0.0), ("!!!", 0.0), ("a\u00a0b", 2 / 3)],
)
def test_alphanumeric_ratio(text, expected):
    assert alphanumeric_ratio(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [("", 0.0), ("a b!", 0.5), ("a\u00a0b", 0.0), ("😀", 1.0), ("12", 1.0), ("ab\t\n", 0.5)],
)
def test_special_character_ratio(text, expected):
    assert special_character_ratio(text) == expected


def test_character_repetition_ratio_hand_computed():
    assert character_repetition_ratio("") == 0.0
    assert character_repetition_ratio("abcdefghi") == 0.0  # shorter than n: no windows
    assert character_repetition_ratio("abcdefghij") == 0.0  # one window, not repeated: k = 0
    assert character_repetition_ratio("a" * 12) == 1.0  # D=1, R=1, k=1: 3/3
    # 15 chars of period 3: 6 windows, 3 distinct each twice; k = min(floor(sqrt(3)), 3) = 1 -> 2/6
    assert character_repetition_ratio("abcabcabcabcabc") == pytest.approx(2 / 6, abs=0)
    # case is kept: no repetition here
    assert character_repetition_ratio("abcdefghijABCDEFGHIJ") == 0.0


def test_character_repetition_k_is_sqrt_of_distinct():
    text = "0123456789" * 3 + "x" * 30  # windows: many distinct, a few repeated
    grams = Counter(text[i : i + 10] for i in range(len(text) - 9))
    freqs = sorted(grams.values(), reverse=True)
    k = min(int(math.sqrt(len(freqs))), sum(1 for f in freqs if f > 1))
    assert character_repetition_ratio(text) == sum(freqs[:k]) / (len(text) - 9)


def test_words_split_lower_strip():
    text = "Hello,  World!\tfoo\nbar\u3000baz a\u00a0b --- 42"
    # split on ' ', '\t', '\n' only; lower-case, then strip special characters from both ends
    assert words(text) == ["hello", "world", "foo", "bar\u3000baz", "a\u00a0b"]
    assert words("") == []
    assert words("!!! ...") == []


def test_word_repetition_ratio_hand_computed():
    ten = "a b c d e f g h i j".split()
    assert word_repetition_ratio(ten[:9]) == 0.0  # fewer than n words
    assert word_repetition_ratio(ten) == 0.0
    # 20 words of period 10: 11 groups, the first occurs twice -> 2/11
    assert word_repetition_ratio(ten + ten) == 2 / 11
    # words are lower-cased and stripped before grouping
    assert word_repetition_ratio(words(" ".join(ten) + " " + " ".join(w.upper() + "," for w in ten))) == 2 / 11


def test_flagged_word_ratio():
    bad = "fuck"
    assert bad in flagged_words("en")
    assert flagged_word_ratio(words("A photo of a dog")) == 0.0
    assert flagged_word_ratio(words(f"This {bad.upper()}!! dog")) == 1 / 3  # case and punctuation do not hide it
    assert f"{bad}zq" not in flagged_words("en")
    assert flagged_word_ratio(words(f"{bad}zq dog")) == 0.0  # whole words only
    assert flagged_word_ratio([]) == 0.0


def test_keep_rule_is_inclusive_at_both_ends():
    settings = RuleFilterSettings(special_character_ratio_min=0.25, special_character_ratio_max=0.5)
    bounds = {"special_character_ratio": settings.bounds()["special_character_ratio"]}
    assert failed_filters({"special_character_ratio": 0.25}, bounds) == []
    assert failed_filters({"special_character_ratio": 0.5}, bounds) == []
    assert failed_filters({"special_character_ratio": 0.2499}, bounds) == ["special_character_ratio"]
    assert failed_filters({"special_character_ratio": 0.5001}, bounds) == ["special_character_ratio"]


def test_empty_and_punctuation_only_captions_are_dropped():
    s = RuleFilterSettings()
    for text in ("", "   ", "!!!???...", "1234567890"):
        failed = failed_filters(caption_stats(normalize_caption(text), s), s.bounds())
        assert "alphanumeric_ratio" in failed or "special_character_ratio" in failed, text
    assert failed_filters(caption_stats("", s), s.bounds())[0] == "alphanumeric_ratio"


def test_perplexity_is_skipped_without_a_model():
    s = RuleFilterSettings()
    assert "perplexity" not in s.bounds()
    assert caption_stats("A dog on a beach.", s)["perplexity"] is None
    assert "perplexity" in RuleFilterSettings(kenlm_model_path="/m.bin").bounds()


def test_normalisation_ftfy_then_punctuation():
    assert normalize_caption("cafÃ©") == "café"  # mojibake fixed
    assert normalize_caption("“Hello”—world…") == '"Hello" - world...'
    assert normalize_caption("１") == "1"  # ftfy's width fix runs first: the table's １→" never fires
    assert normalize_punctuation("１") == '"'
    assert normalize_punctuation("a．b") == "a. b"
    assert normalize_caption("e\u0301") == "\u00e9"  # NFC
    assert normalize_caption("a\u00a0b") == "a\u00a0b"  # NBSP untouched


def test_dedup_key_is_of_the_exact_normalised_text():
    assert dedup_key("A dog.") == dedup_key("A dog.")
    assert dedup_key("A dog.") != dedup_key("a dog.")
    assert len(dedup_key("x")) == 16


def test_coco_val2017_counts_match_data_juicer(coco_path):
    """SPEC §1: Data-Juicer's own ops keep 23,063 of 25,014 COCO val2017 captions; per filter (alone):
    alphanumeric 0, character repetition 125, flagged words 11, special characters 1,831 (all below
    the minimum), word repetition 0."""
    captions = [a["caption"] for a in json.loads(coco_path.read_text())["annotations"]]
    s = RuleFilterSettings()
    bounds = s.bounds()
    fails, below_min = Counter(), 0
    kept = 0
    for caption in captions:
        stats = caption_stats(normalize_caption(caption), s)
        failed = failed_filters(stats, bounds)
        kept += not failed
        fails.update(failed)
        below_min += stats["special_character_ratio"] < s.special_character_ratio_min
    assert len(captions) == 25_014
    assert kept == 23_063
    assert dict(fails) == {
        "character_repetition_ratio": 125,
        "flagged_word_ratio": 11,
        "special_character_ratio": 1_831,
    }
    assert below_min == 1_831
