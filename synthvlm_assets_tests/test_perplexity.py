"""The KenLM perplexity filter with a SentencePiece model and an ARPA model the test builds.

The expected value is computed from the ARPA table by hand (a unigram model: the score of a line
is the sum of its pieces' log10 probabilities plus that of </s>), not by calling KenLM.
"""

from __future__ import annotations

import io

import kenlm  # noqa: F401 - installed with the test extras: a missing module fails here, never skips
import pyarrow as pa
import pytest
import sentencepiece as spm

from synthvlm_assets.captions.curation import curate_captions
from synthvlm_assets.captions.filters import PerplexityModel, RuleFilterSettings


CORPUS = ["a dog runs on the beach", "a cat sleeps on the sofa", "the dog and the cat", "two birds on a wire"] * 20


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("ppl")
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS), model_writer=model, vocab_size=16, model_type="word", minloglevel=2
    )
    (d / "en.sp.model").write_bytes(model.getvalue())
    sp = spm.SentencePieceProcessor(model_file=str(d / "en.sp.model"))
    pieces = sorted({p for line in CORPUS for p in sp.encode_as_pieces(line)})
    logp = {p: -0.5 - 0.1 * i for i, p in enumerate(pieces)}
    logp.update({"<unk>": -3.0, "</s>": -0.7})
    # KenLM wants at least a bigram section: one bigram no test text contains, backoffs of 0, so
    # every score is the sum of unigram log-probabilities.
    lines = ["\\data\\", f"ngram 1={len(logp) + 1}", "ngram 2=1", "", "\\1-grams:", "-99\t<s>\t0"]
    lines += [f"{v}\t{k}\t0" for k, v in logp.items()]
    lines += ["", "\\2-grams:", "-0.1\t<s> </s>", "", "\\end\\", ""]
    (d / "en.arpa").write_text("\n".join(lines))
    return str(d / "en.arpa"), str(d / "en.sp.model"), sp, logp


def expected_ppl(text: str, sp, logp) -> float:
    pieces = sp.encode_as_pieces(text)
    score = sum(logp.get(p, logp["<unk>"]) for p in pieces) + logp["</s>"]
    return round(10 ** (-score / (len(pieces) + 1)), 1)


def test_perplexity_matches_the_formula(models):
    arpa, sp_path, sp, logp = models
    ppl = PerplexityModel(arpa, sp_path)
    for text in ["a dog runs on the beach", "the cat", "zebra quantum xylophone", "a dog\nand a cat"]:
        assert ppl(text) == expected_ppl(text, sp, logp), text


def test_perplexity_filter_rejects_with_its_value(models):
    arpa, sp_path, sp, logp = models
    good, odd = "a dog runs on the beach", "Zebra quantum xylophone marmalade."
    ppl_good, ppl_odd = expected_ppl(good, sp, logp), expected_ppl(odd, sp, logp)
    assert ppl_good < ppl_odd
    threshold = (ppl_good + ppl_odd) / 2
    settings = RuleFilterSettings(kenlm_model_path=arpa, sentencepiece_model_path=sp_path, perplexity_max=threshold)
    raw = pa.table(
        {
            "caption_id": ["f:0", "f:1"],
            "caption": [good, odd],
            "caption_normalized": [good, odd],
            "dedup_key": [b"\x01" * 16, b"\x02" * 16],
            "source": ["t", "t"],
            "source_id": [None, None],
            "source_file": ["f", "f"],
            "source_row": [0, 1],
            "image_ref": [None, None],
            "shard": ["s", "s"],
        }
    )
    result = curate_captions(raw, settings, 1, None, PerplexityModel(arpa, sp_path))
    assert result.kept.column("caption").to_pylist() == [good]
    (row,) = result.rejected.to_pylist()
    assert row["reject_reason"] == "perplexity" and row["reject_value"] == ppl_odd > threshold
    assert result.kept.column("perplexity").to_pylist() == [ppl_good]


def test_missing_model_file_is_named(tmp_path, models):
    _, sp_path, _, _ = models
    with pytest.raises(FileNotFoundError, match="kenlm_model_path='/nope/en.arpa.bin'"):
        PerplexityModel("/nope/en.arpa.bin", sp_path)
