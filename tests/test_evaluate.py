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


ZH_HYPS = ["我喜欢吃苹果。", "今天天气很好。", "他在公园里跑步。"]
ZH_REFS = ["我爱吃苹果。", "今天的天气很好。", "他在公园跑步。"]


def zh_files(tmp_path: Path) -> list[str]:
    """--ref and --hyp arguments for the small Chinese example."""
    ref = write_lines(tmp_path / "ref.zh", ZH_REFS)
    hyp = write_lines(tmp_path / "hyp.zh", ZH_HYPS)
    return ["evaluate", "--ref", str(ref), "--hyp", str(hyp)]


def one_error_line(proc) -> str:
    """The single stderr line of a command that failed as a user mistake (exit 2, nothing on stdout)."""
    lines = proc.stderr.strip().splitlines()
    assert proc.exit_code == 2 and len(lines) == 1 and proc.stdout == "", proc.output
    return lines[0]


@pytest.mark.parametrize(("lang", "tokenize", "expected"), [
    ("zh", None, "zh"), ("ZH-tw", None, "zh"), ("ja", None, "ja-mecab"), ("ko_KR", None, "ko-mecab"),
    ("en", None, "13a"), ("de", None, "13a"), (None, None, "13a"), ("zh", "char", "char"),
    ("en", "intl", "intl"), (None, "none", "none")])
def test_bleu_tokenizer_follows_the_target_language_unless_named(lang, tokenize, expected):
    from mtkit.evaluate import bleu_tokenizer

    assert bleu_tokenizer(lang, tokenize) == expected


def test_score_with_a_target_language_uses_its_tokenizer():
    zh = score(ZH_HYPS, [ZH_REFS], metrics=("bleu",), lang="zh")
    assert "tok:zh" in zh["signature"]["bleu"]
    assert zh["bleu"] == round(sacrebleu.corpus_bleu(ZH_HYPS, [ZH_REFS], tokenize="zh").score, 2)
    assert zh["bleu"] > score(ZH_HYPS, [ZH_REFS], metrics=("bleu",))["bleu"]  # 13a: one token a line
    assert "tok:13a" in score(HYPS, [REFS], metrics=("bleu",), lang="en")["signature"]["bleu"]
    char = score(ZH_HYPS, [ZH_REFS], lang="zh", tokenize="char")
    assert "tok:char" in char["signature"]["bleu"] and "tok:char" in char["signature"]["bleu_lc"]
    assert "tok:tercom" in char["signature"]["ter"]  # chrF and TER do not change with the language
    assert char["chrf"] == score(ZH_HYPS, [ZH_REFS])["chrf"]


def test_bootstrap_uses_the_target_languages_tokenizer():
    boot = bootstrap(("hyp", ZH_HYPS), [ZH_REFS], ["ref"], None, 50, 1, lang="zh")
    assert "tok:zh" in boot["signature"]["bleu"]
    assert boot["system"]["bleu"]["score"] == score(ZH_HYPS, [ZH_REFS], lang="zh")["bleu"]


def test_cli_language_zh_signs_tok_zh_and_scores_chinese_otherwise_than_13a(tmp_path):
    args = zh_files(tmp_path)
    proc = CliRunner().invoke(app, [*args, "-l", "zh", "--json"])
    assert proc.exit_code == 0, proc.output
    zh = json.loads(proc.stdout)
    assert "tok:zh" in zh["signature"]["bleu"] and "tok:zh" in zh["signature"]["bleu_lc"]
    assert zh["bleu"] == round(sacrebleu.corpus_bleu(ZH_HYPS, [ZH_REFS], tokenize="zh").score, 2)
    plain = json.loads(CliRunner().invoke(app, [*args, "--json"]).stdout)
    assert "tok:13a" in plain["signature"]["bleu"] and plain["bleu"] != zh["bleu"]
    text = CliRunner().invoke(app, [*args, "--language", "zh", "--confidence", "--bootstrap-samples", "50"])
    assert text.exit_code == 0, text.output
    assert text.stdout.splitlines()[0].startswith("BLEU") and "tok:zh" in text.stdout.splitlines()[0]
    assert any(line.startswith("BLEU  nrefs:1|bs:50") and "tok:zh" in line
               for line in text.stdout.splitlines())


def test_cli_tokenize_names_the_tokenizer_and_overrides_the_language(tmp_path):
    args = zh_files(tmp_path)
    base = write_lines(tmp_path / "base.zh", ZH_REFS)
    proc = CliRunner().invoke(app, [*args, "-l", "zh", "--tokenize", "char", "--baseline", str(base),
                                    "--bootstrap-samples", "50", "--json"])
    assert proc.exit_code == 0, proc.output
    result = json.loads(proc.stdout)
    assert "tok:char" in result["signature"]["bleu"]
    assert "tok:char" in result["bootstrap"]["signature"]["bleu"]
    assert result["bleu"] == round(sacrebleu.corpus_bleu(ZH_HYPS, [ZH_REFS], tokenize="char").score, 2)


def test_cli_language_en_keeps_13a(tmp_path):
    ref = write_lines(tmp_path / "ref.en", REFS)
    hyp = write_lines(tmp_path / "hyp.en", HYPS)
    proc = CliRunner().invoke(app, ["evaluate", "--ref", str(ref), "--hyp", str(hyp), "-l", "en", "--json"])
    assert proc.exit_code == 0, proc.output
    result = json.loads(proc.stdout)
    assert "tok:13a" in result["signature"]["bleu"] and "tok:13a" in result["signature"]["bleu_lc"]
    assert result["bleu"] == score(HYPS, [REFS])["bleu"]


def test_cli_unknown_tokenizer_is_one_error_line_listing_the_names(tmp_path):
    line = one_error_line(CliRunner().invoke(app, [*zh_files(tmp_path), "--tokenize", "13b"]))
    assert "'13b'" in line and all(name in line for name in ("13a", "zh", "char", "ja-mecab", "flores200"))
    with pytest.raises(UserError, match="unknown BLEU tokenizer"):
        score(ZH_HYPS, [ZH_REFS], tokenize="13b")


@pytest.mark.parametrize(("lang", "module", "extra"), [("ja", "tokenizer_ja_mecab", "mtkit[ja]"),
                                                       ("ko", "tokenizer_ko_mecab", "mtkit[ko]")])
def test_a_missing_mecab_package_is_one_line_naming_the_extra(tmp_path, monkeypatch, lang, module, extra):
    import importlib

    # sacrebleu sets MeCab to None when its import fails; force that even where the package is installed
    monkeypatch.setattr(importlib.import_module(f"sacrebleu.tokenizers.{module}"), "MeCab", None)
    line = one_error_line(CliRunner().invoke(app, [*zh_files(tmp_path), "-l", lang]))
    assert f'pip install "{extra}"' in line
    src = write_lines(tmp_path / "src.txt", ZH_REFS)  # checked before any model is loaded
    line = one_error_line(CliRunner().invoke(app, [*zh_files(tmp_path)[:3], "-m", str(tmp_path / "no.pt"),
                                                   "--src", str(src), "-l", lang]))
    assert extra in line and "no.pt" not in line
    with pytest.raises(UserError, match=f"mtkit\\[{lang}\\]"):
        score(ZH_HYPS, [ZH_REFS], metrics=("bleu",), lang=lang)


def test_a_language_pair_as_sacrebleu_writes_it_picks_the_target_side():
    from mtkit.evaluate import bleu_tokenizer

    assert [bleu_tokenizer(x) for x in ("en-zh", "zh-en", "zh-TW", "en-ja", "ko")] == [
        "zh", "13a", "zh", "ja-mecab", "ko-mecab"]
