"""Scoring goes through sacreBLEU unchanged, with signatures, and refuses mismatched counts; the
lowercased BLEU is sacreBLEU's lowercase=True; bootstrap resampling is sacrebleu's own."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import sacrebleu
from typer.testing import CliRunner

from mtkit.cli import app
from mtkit.errors import UserError
from mtkit.evaluate import bootstrap, format_report, score

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
    assert set(result["signature"]) == {"bleu", "chrf", "ter", "bleu_lc"}
    report = format_report(result)
    assert report.splitlines()[0].startswith("BLEU") and result["signature"]["ter"] in report


def test_line_count_mismatch_is_an_error_before_scoring():
    with pytest.raises(UserError, match="hyp.txt has 3 lines but ref.txt has 2"):
        score(HYPS, [REFS[:2]], names=("hyp.txt", ["ref.txt"]))


WORDS = ["the", "a", "small", "big", "dog", "cat", "man", "woman", "runs", "sits", "on", "in", "red", "blue"]


def toy_refs(n: int = 60, seed: int = 0) -> list[str]:
    """Random capitalised word strings, one reference per line."""
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=int(rng.integers(5, 12)))).capitalize() + " ." for _ in range(n)]


def drop_words(line: str) -> str:
    """A corrupted hypothesis: every other word of the line."""
    return " ".join(line.split()[::2])


def test_lowercased_bleu_is_sacrebleus_lowercase_and_labelled():
    cased_wrong = [h.upper() if i % 2 else h.lower() for i, h in enumerate(HYPS)]
    result = score(cased_wrong, [REFS])
    assert result["bleu_lc"] == round(sacrebleu.corpus_bleu(cased_wrong, [REFS], lowercase=True).score, 2)
    assert result["bleu_lc"] > result["bleu"]
    assert "case:lc" in result["signature"]["bleu_lc"] and "tok:13a" in result["signature"]["bleu_lc"]
    report = format_report(result)
    assert result["signature"]["bleu_lc"] in report and "not comparable" in report
    assert score(HYPS, [REFS])["bleu_lc"] >= score(HYPS, [REFS])["bleu"]


def test_a_system_against_itself_is_not_significant():
    refs = toy_refs()
    hyps = [drop_words(r) if i % 3 == 0 else r for i, r in enumerate(refs)]
    out = bootstrap(("a.txt", hyps), [refs], ["ref.txt"], ("b.txt", list(hyps)), 200, 12345)
    for key in ("bleu", "chrf"):
        assert out["system"][key]["p_value"] == 1.0
        assert out["system"][key]["score"] == out["baseline"][key]["score"]


def test_systems_of_equal_quality_are_not_significant_and_a_clearly_better_one_is():
    refs = toy_refs()
    even = [drop_words(r) if i % 2 == 0 else r for i, r in enumerate(refs)]
    odd = [drop_words(r) if i % 2 == 1 else r for i, r in enumerate(refs)]
    worse = [drop_words(r) for r in refs]
    same = bootstrap(("even", even), [refs], ["ref"], ("odd", odd), 1000, 12345)
    better = bootstrap(("refs", refs), [refs], ["ref"], ("worse", worse), 1000, 12345)
    for key in ("bleu", "chrf"):
        assert same["system"][key]["p_value"] > 0.05
        assert better["system"][key]["p_value"] < 0.05
        assert better["system"][key]["score"] > better["baseline"][key]["score"]
    assert better["baseline"]["name"] == "worse" and better["system"]["name"] == "refs"
    assert "bs:1000" in better["signature"]["bleu"] and "seed:12345" in better["signature"]["chrf"]


def test_confidence_interval_is_sacrebleus_and_the_seed_is_respected(monkeypatch):
    monkeypatch.delenv("SACREBLEU_SEED", raising=False)
    refs = toy_refs()
    hyps = [drop_words(r) if i % 2 else r for i, r in enumerate(refs)]
    out = bootstrap(("hyp", hyps), [refs], ["ref"], None, 500, 12345)
    assert "baseline" not in out and "p_value" not in out["system"]["bleu"]
    expected = sacrebleu.metrics.BLEU().corpus_score(hyps, [refs], n_bootstrap=500)  # seed 12345 by default
    assert out["system"]["bleu"]["mean"] == round(float(expected._mean), 2)
    assert out["system"]["bleu"]["ci95_half_width"] == round(float(expected._ci), 2)
    assert bootstrap(("hyp", hyps), [refs], ["ref"], None, 500, 12345) == out
    assert bootstrap(("hyp", hyps), [refs], ["ref"], None, 500, 7)["system"]["bleu"] != out["system"]["bleu"]
    assert "SACREBLEU_SEED" not in os.environ


def test_baseline_line_count_mismatch_names_the_file():
    with pytest.raises(UserError, match="base.txt has 2 lines but ref.txt has 3"):
        bootstrap(("hyp.txt", HYPS), [REFS], ["ref.txt"], ("base.txt", HYPS[:2]), 100, 1)


def write_lines(path: Path, lines: list[str]) -> Path:
    """`lines` as a UTF-8 file at `path`, one per line."""
    path.write_text("".join(f"{line}\n" for line in lines), encoding="utf-8")
    return path


def test_cli_paired_bootstrap_json_keeps_the_top_level_keys(tmp_path):
    refs = toy_refs()
    ref = write_lines(tmp_path / "ref.txt", refs)
    new = write_lines(tmp_path / "new.txt", refs)
    old = write_lines(tmp_path / "old.txt", [drop_words(r) for r in refs])
    args = ["evaluate", "--ref", str(ref), "--hyp", str(new), "--baseline", str(old),
            "--bootstrap-samples", "200"]
    proc = CliRunner().invoke(app, [*args, "--json"])
    assert proc.exit_code == 0, proc.output
    result = json.loads(proc.stdout)
    assert {"bleu", "chrf", "ter", "bleu_lc"} <= set(result) and result["bleu"] == score(refs, [refs])["bleu"]
    assert set(result["signature"]) == {"bleu", "chrf", "ter", "bleu_lc"}
    boot = result["bootstrap"]
    assert (boot["baseline"]["name"] == str(old) and boot["system"]["name"] == str(new)
            and boot["samples"] == 200)
    assert set(boot["system"]["bleu"]) == {"score", "mean", "ci95_half_width", "p_value"}
    assert boot["system"]["bleu"]["p_value"] < 0.05
    text = CliRunner().invoke(app, args).stdout
    assert any(line.startswith("baseline") and str(old) in line for line in text.splitlines())
    assert "BLEU-lc" in text and "p = " in text


def test_cli_baseline_with_other_line_count_is_one_error_line(tmp_path):
    ref = write_lines(tmp_path / "ref.txt", REFS)
    hyp = write_lines(tmp_path / "hyp.txt", HYPS)
    base = write_lines(tmp_path / "base.txt", HYPS[:2])
    proc = CliRunner().invoke(app, ["evaluate", "--ref", str(ref), "--hyp", str(hyp),
                                    "--baseline", str(base)])
    lines = proc.stderr.strip().splitlines()
    assert proc.exit_code == 2 and len(lines) == 1 and proc.stdout == ""
    assert f"{base} has 2 lines but {ref} has 3" in lines[0]
