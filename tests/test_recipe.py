"""scripts/recipe.sh: one command from a config to the test split's scores."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import yaml

from conftest import ROOT, synthetic_pairs, write_text_pair

ENV = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}


def config(work: Path, **splits) -> Path:
    raw = {"data": {"format": "text", "dir": str(work), "src_lang": "xx", "tgt_lang": "yy",
                    "splits": {"train": "train.{lang}", "valid": "valid.{lang}", **splits},
                    "prepared_dir": str(work / "prepared")},
           "tokenizer": {"vocab_size": 320},
           "model": {"d_model": 32, "n_heads": 2, "d_ff": 64, "n_layers": 1, "max_positions": 64},
           "train": {"max_tokens": 300, "max_steps": 6, "warmup_steps": 2, "valid_every": 2,
                     "valid_bleu_sentences": 4, "device": "cpu", "threads": 1, "run_dir": str(work / "run")},
           "decode": {"beam_size": 2, "max_len_offset": 5}}
    path = work / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def recipe(path: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(ROOT / "scripts" / "recipe.sh"), str(path), *args],
                          capture_output=True, text=True, timeout=600,
                          env={**ENV, "RECIPE_AVERAGE": "2", **env})


def test_recipe_runs_a_config_end_to_end_and_prints_the_test_scores_last(tmp_path):
    pairs = synthetic_pairs(300)
    write_text_pair(tmp_path, "train", pairs[:260])
    write_text_pair(tmp_path, "valid", pairs[260:280])
    write_text_pair(tmp_path, "test", pairs[280:], gz=True)
    proc = recipe(config(tmp_path, test="test.{lang}.gz"), "--set", "train.max_steps=4")
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert {"bleu", "chrf", "ter", "signature"} <= set(result)
    run = tmp_path / "run"
    assert json.loads((run / "test.json").read_text()) == result
    assert len((run / "test.hyp").read_text().splitlines()) == 20  # every test line translated
    assert len((run / "valid.hyp").read_text().splitlines()) == 20
    assert "recipe: validation:" in proc.stderr
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert max(r.get("step", 0) for r in log) == 4  # the --set reached training
    assert (run / "checkpoints" / "averaged.pt").is_file()


def test_recipe_without_a_test_split_is_one_error_line_before_any_work(tmp_path):
    write_text_pair(tmp_path, "train", synthetic_pairs(50))
    write_text_pair(tmp_path, "valid", synthetic_pairs(5))
    proc = recipe(config(tmp_path))
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines() == [
        f"recipe: error: {tmp_path / 'recipe.yaml'}: data.splits.test is needed by scripts/recipe.sh"]
    assert not (tmp_path / "prepared").exists() and not (tmp_path / "run").exists()


def test_recipe_test_0_compares_on_validation_only_and_needs_no_test_split(tmp_path):
    pairs = synthetic_pairs(300)
    write_text_pair(tmp_path, "train", pairs[:260])
    write_text_pair(tmp_path, "valid", pairs[260:280])
    path = config(tmp_path)  # no data.splits.test
    proc = recipe(path, "--set", "train.max_steps=2", RECIPE_TEST="0")
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "run"
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert json.loads((run / "valid.json").read_text()) == result
    assert len((run / "valid.hyp").read_text().splitlines()) == 20
    assert not (run / "test.hyp").exists() and not (run / "test.json").exists()
    bad = recipe(path, RECIPE_TEST="yes")
    assert bad.returncode == 2
    assert bad.stderr.strip() == "recipe: error: RECIPE_TEST must be 0 or 1, not 'yes'"
