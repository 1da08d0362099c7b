"""Scoring goes through sacreBLEU unchanged, with signatures, and refuses mismatched counts."""

from __future__ import annotations

import pytest
import sacrebleu

from mtkit.errors import UserError
from mtkit.evaluate import format_report, score

HYPS = ["The dog runs in the park .", "A man sits on a red bench", "Two women talk"]
REFS = ["The dog is running in the park.", "A man is sitting on a red bench.", "Two women are talking."]
REFS2 = ["A dog runs in a park.", "A man sits on a red bench.", "Two women talk."]


def test_scores_equal_sacrebleu_with_one_and_two_references():
    for refs in ([REFS], [REFS, REFS2]):
        result = score(HYPS, refs)
        assert result["bleu"] == round(sacrebleu.corpus_bleu(HYPS, refs).score, 2)
        assert result["chrf"] == round(sacrebleu.corpus_chrf(HYPS, refs).score, 2)
        assert result["ter"] == round(sacrebleu.corpus_ter(HYPS, refs).score, 2)
    assert score(HYPS, [REFS, REFS2])["bleu"] > score(HYPS, [REFS])["bleu"]


def test_signatures_name_the_settings():
    result = score(HYPS, [REFS])
    assert "tok:13a" in result["signature"]["bleu"] and "case:mixed" in result["signature"]["bleu"]
    assert set(result["signature"]) == {"bleu", "chrf", "ter"}
    report = format_report(result)
    assert report.splitlines()[0].startswith("BLEU") and result["signature"]["ter"] in report


def test_line_count_mismatch_is_an_error_before_scoring():
    with pytest.raises(UserError, match="hyp.txt has 3 lines but ref.txt has 2"):
        score(HYPS, [REFS[:2]], names=("hyp.txt", ["ref.txt"]))
