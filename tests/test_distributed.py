"""DDP through torchrun on CPU (gloo): 2 processes compute the same run as 1 process with
gradient accumulation 2, and only rank 0 writes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from conftest import ROOT, synthetic_pairs, write_text_pair
from mtkit.checkpoint import load_checkpoint, step_checkpoints
from mtkit.config import config_from_dict
from mtkit.prepare import prepare

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed not built")


def _config(tmp_path: Path) -> dict:
    return {
        "data": {"format": "text", "dir": str(tmp_path),
                 "splits": {"train": "train.{lang}", "valid": "valid.{lang}"},
                 "src_lang": "xx", "tgt_lang": "yy", "prepared_dir": str(tmp_path / "prepared")},
        "tokenizer": {"vocab_size": 60, "byte_fallback": False},
        "model": {"d_model": 32, "n_heads": 2, "d_ff": 64, "n_layers": 1, "dropout": 0.0,
                  "max_positions": 128},
        "train": {"max_tokens": 200, "max_steps": 12, "warmup_steps": 4, "log_every": 1, "valid_every": 6,
                  "valid_bleu_sentences": 4, "precision": "fp32", "device": "cpu", "threads": 1, "seed": 3},
        "decode": {"beam_size": 2, "max_len_offset": 5},
    }


def _train(tmp_path: Path, run: str, nproc: int, accum: int) -> list[dict]:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    sets = ["--set", f"train.run_dir={tmp_path / run}", "--set", f"train.accum_steps={accum}"]
    launcher = [sys.executable, "-m", "mtkit"] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
        "-m", "mtkit"]
    proc = subprocess.run([*launcher, "train", str(tmp_path / "run.yaml"), *sets], capture_output=True,
                          text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(line) for line in (tmp_path / run / "log.jsonl").read_text().splitlines()]


def test_two_processes_match_one_process_with_accumulation(tmp_path):
    pairs = synthetic_pairs(400)
    write_text_pair(tmp_path, "train", pairs)
    write_text_pair(tmp_path, "valid", pairs[:8])
    raw = _config(tmp_path)
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(raw))
    prepare(config_from_dict(raw))

    single = _train(tmp_path, "single", nproc=1, accum=2)
    ddp = _train(tmp_path, "ddp", nproc=2, accum=1)
    curve = lambda log: [(r["step"], r["loss"]) for r in log if "loss" in r]  # noqa: E731
    assert [s for s, _ in curve(single)] == list(range(1, 13))
    assert [s for s, _ in curve(ddp)] == [s for s, _ in curve(single)]
    for (_, a), (_, b) in zip(curve(single), curve(ddp)):
        assert b == pytest.approx(a, rel=1e-4)
    assert curve(single)[-1][1] < curve(single)[0][1]  # it learned: the comparison is not of constants
    # the same tokens were seen: throughput counts and padding agree
    assert ([r["padding"] for r in ddp if "loss" in r]
            == pytest.approx([r["padding"] for r in single if "loss" in r]))

    # rank 0 alone wrote: one set of checkpoints, one log line per step, and the same weights
    assert ([p.name for p in step_checkpoints(tmp_path / "ddp" / "checkpoints")]
            == ["step_00000006.pt", "step_00000012.pt"])
    w1 = load_checkpoint(tmp_path / "single" / "checkpoints" / "step_00000012.pt")["model"]
    w2 = load_checkpoint(tmp_path / "ddp" / "checkpoints" / "step_00000012.pt")["model"]
    for key in w1:
        torch.testing.assert_close(w2[key], w1[key], atol=1e-4, rtol=1e-3)
