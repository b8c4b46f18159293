"""The ASCII fast path around ftfy must never change a result."""

from __future__ import annotations

import json
import random

import ftfy

from synthvlm_assets.captions.normalize import fix_unicode


def _ftfy(text: str) -> str:
    return ftfy.fix_text(text, normalization="NFC")


def test_fast_path_agrees_with_ftfy_on_random_ascii():
    rng = random.Random(0)
    alphabet = [chr(c) for c in range(128)] + ["&amp;", "&lt;", "&#39;", "\r\n", "\x1b[31m", "<b>", "&nbsp;"]
    for _ in range(20_000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 40)))
        assert fix_unicode(text) == _ftfy(text), repr(text)


def test_fast_path_agrees_with_ftfy_on_coco(coco_path):
    for a in json.loads(coco_path.read_text())["annotations"]:
        assert fix_unicode(a["caption"]) == _ftfy(a["caption"])
