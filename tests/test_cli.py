"""The command line at a terminal and off one: versions, completion, plain tracebacks, progress
lines, time-stamped logs, a time budget for training, and line-by-line interactive translation."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import select
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, synthetic_pairs, untrained_checkpoint, write_text_pair
from mtkit.config import config_from_dict, parse_duration
from mtkit.errors import UserError
from mtkit.prepare import prepare

ENV = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}


def mtkit(*args: str, cwd: Path, env: dict | None = None, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mtkit", *args], cwd=cwd, capture_output=True, text=True,
                          env=env or ENV, timeout=300, **kw)


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    """A synthetic corpus, prepared once, and run.yaml: a tiny model trained for 12 steps."""
    work = tmp_path_factory.mktemp("cli")
    pairs = synthetic_pairs(400)
    write_text_pair(work, "train", pairs)
    write_text_pair(work, "valid", pairs[:6])
    raw = {"data": {"dir": str(work), "splits": {"train": "train.{lang}", "valid": "valid.{lang}"},
                    "src_lang": "xx", "tgt_lang": "yy", "prepared_dir": str(work / "prepared")},
           "tokenizer": {"vocab_size": 320},
           "model": {"d_model": 32, "n_heads": 2, "d_ff": 64, "n_layers": 1, "max_positions": 64},
           "train": {"max_tokens": 300, "max_steps": 12, "warmup_steps": 4, "log_every": 2, "valid_every": 6,
                     "valid_bleu_sentences": 3, "device": "cpu", "threads": 1, "run_dir": str(work / "run")},
           "decode": {"beam_size": 2, "max_len_offset": 5}}
    (work / "run.yaml").write_text(yaml.safe_dump(raw))
    prepare(config_from_dict(raw))
    return work


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_version_names_mtkit_and_what_it_computes_with(tmp_path):
    proc = mtkit("--version", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("mtkit 0.")
    assert lines[1].startswith("torch ") and "CPU capability" in lines[1] and "CUDA" in lines[1]
    assert any(line.startswith("sentencepiece ") for line in lines)
    assert any(line.startswith("sacrebleu ") for line in lines)


def test_shell_completion_completes_commands_and_options(tmp_path):
    assert "--install-completion" in mtkit("--help", cwd=tmp_path).stdout
    env = {**ENV, "_MTKIT_COMPLETE": "complete_bash", "COMP_WORDS": "mtkit tr", "COMP_CWORD": "1"}
    assert mtkit(cwd=tmp_path, env=env).stdout.split() == ["train", "translate"]
    env.update(COMP_WORDS="mtkit translate --gre", COMP_CWORD="2")
    assert mtkit(cwd=tmp_path, env=env).stdout.split() == ["--greedy"]


def test_an_internal_error_prints_a_plain_traceback_without_local_variables(tmp_path):
    (tmp_path / "ref.txt").write_text("a\n")
    secret = "local-variable-value-that-must-not-print"
    code = ("import sys, mtkit.evaluate as e, mtkit.cli as c\n"
            "def broken(*args, **kwargs):\n"
            f"    hidden = {secret!r}\n"
            "    raise RuntimeError('internal failure')\n"
            "e.score = broken\n"
            "sys.argv = ['mtkit', 'evaluate', '--ref', 'ref.txt', '--hyp', 'ref.txt']\n"
            "c.run()\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, env=ENV,
                          timeout=120)
    assert proc.returncode == 1
    assert ("Traceback (most recent call last)" in proc.stderr
            and "RuntimeError: internal failure" in proc.stderr)
    assert secret not in proc.stderr and "╭" not in proc.stderr  # no pretty box with locals


def test_training_off_a_terminal_logs_plain_progress_lines_and_records_its_start(work):
    proc = mtkit("train", "run.yaml", "--force", cwd=work)
    assert proc.returncode == 0, proc.stderr
    err = proc.stderr
    assert "\r" not in err and "it/s" not in err and "step/s" not in err  # no bar drawn into a log
    assert err.splitlines()[0].startswith("mtkit: precision fp32 (auto: CPU ")
    progress = [line for line in err.splitlines() if line.startswith("mtkit: step ") and "ETA" in line]
    assert len(progress) == 6  # every log_every (2) of 12 steps
    assert all("loss" in line and "lr" in line and "tgt tokens/s" in line and "elapsed 0:00:" in line
               for line in progress)
    assert "mtkit: step 6: valid loss" in err
    log = records(work / "run" / "log.jsonl")
    assert all("time" in r and "elapsed" in r for r in log)
    assert [r["elapsed"] for r in log] == sorted(r["elapsed"] for r in log)
    assert log[-1]["stopped"] == "reached max_steps 12"
    start, = records(work / "run" / "starts.jsonl")
    assert start["precision"] == "fp32" and "CPU" in start["hardware"] and start["versions"]["mtkit"]
    assert start["versions"]["torch"] and start["resumed"] is False


def test_quiet_training_prints_nothing(work):
    proc = mtkit("-q", "train", "run.yaml", "--force", cwd=work)
    assert proc.returncode == 0 and proc.stderr == ""


def _run_on_pty(args: list[str], cwd: Path, stdin_pty: bool = False, send: list[bytes] = (),
                timeout: float = 120.0) -> tuple[int, str, list[tuple[float, str]]]:
    """Run mtkit with stderr (or stdin) on a pseudo-terminal; returns exit code, what the terminal
    showed, and stdout lines with the time each arrived."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))  # a terminal's size
    kw = {"stdin": slave} if stdin_pty else {"stderr": slave, "stdin": subprocess.DEVNULL}
    proc = subprocess.Popen([sys.executable, "-m", "mtkit", *args], cwd=cwd, stdout=subprocess.PIPE, env=ENV,
                            **kw)
    os.close(slave)
    shown, lines, pending, deadline = b"", [], list(send), time.time() + timeout
    out_buf = b""
    while time.time() < deadline:
        ready, _, _ = select.select([master, proc.stdout], [], [], 0.2)
        if master in ready:
            try:
                shown += os.read(master, 65536)
            except OSError:
                pass
        if proc.stdout in ready:
            chunk = os.read(proc.stdout.fileno(), 65536)
            out_buf += chunk
            while b"\n" in out_buf:
                line, out_buf = out_buf.split(b"\n", 1)
                lines.append((time.time(), line.decode()))
            if not chunk and proc.poll() is not None:
                break
        if pending and stdin_pty and len(lines) == len(send) - len(pending):
            os.write(master, pending.pop(0))
        if proc.poll() is not None and proc.stdout not in ready and master not in ready:
            break
    proc.wait(timeout=10)
    os.close(master)
    return proc.returncode, shown.decode(errors="replace"), lines


def test_training_at_a_terminal_draws_a_progress_bar(work):
    code, shown, _ = _run_on_pty(["train", "run.yaml", "--force"], work)
    assert code == 0, shown
    assert "\r" in shown and "train:" in shown and "12/12" in shown


def test_translate_at_a_terminal_answers_each_line_as_it_is_entered(tmp_path):
    model = untrained_checkpoint(tmp_path)
    eot = b"\x04"  # Ctrl-D on an empty line ends the input
    code, _, lines = _run_on_pty(["translate", "-m", str(model)], tmp_path, stdin_pty=True,
                                 send=[b"the dog runs\n", b"a red house\n", eot])
    assert code == 0
    assert len(lines) == 2  # each answered before the next was typed (they are sent one by one)


def test_max_time_stops_on_time_with_a_checkpoint_and_resume_continues(work, tmp_path):
    cfg = ["--set", f"train.run_dir={tmp_path / 'timed'}", "--set", "train.max_steps=1000000",
           "--set", "train.valid_every=1000000", "--set", "train.log_every=20"]
    began = time.time()
    first = mtkit("train", "run.yaml", *cfg, "--set", "train.max_time=8s", cwd=work)
    took = time.time() - began
    assert first.returncode == 0, first.stderr
    assert "reached max_time 8s" in first.stderr and took < 8 + 30  # startup and imports come on top
    log = records(tmp_path / "timed" / "log.jsonl")
    stopped = log[-1]
    # the budget counts from the start of `train` (loading included): how many steps fit in it
    # depends on how busy the machine is
    assert "max_time" in stopped["stopped"] and stopped["step"] > 0
    assert any(r.get("valid_bleu") is not None and r["step"] == stopped["step"]
               for r in log)  # final validation
    assert (tmp_path / "timed" / "checkpoints" / f"step_{stopped['step']:08d}.pt").is_file()
    second = mtkit("train", "run.yaml", *cfg, "--set", "train.max_time=6", "--resume", cwd=work)
    assert second.returncode == 0, second.stderr
    assert "resumed from" in second.stderr
    log = records(tmp_path / "timed" / "log.jsonl")
    assert log[-1]["step"] > stopped["step"] and log[-1]["elapsed"] > stopped["elapsed"]
    assert len(records(tmp_path / "timed" / "starts.jsonl")) == 2


@pytest.mark.parametrize("value, seconds", [(90, 90.0), ("90", 90.0), ("90s", 90.0), ("15m", 900.0),
                                            ("2h", 7200.0), ("1h30m", 5400.0), (0.5, 0.5)])
def test_durations(value, seconds):
    assert parse_duration(value) == seconds


def test_a_bad_max_time_names_the_key():
    with pytest.raises(UserError, match=r"train.max_time: '15x' is not a duration"):
        config_from_dict({"data": {"splits": {"train": "t", "valid": "v"}}, "train": {"max_time": "15x"}})
    with pytest.raises(UserError, match=r"train.max_time: -3.0 must be a positive"):
        config_from_dict({"data": {"splits": {"train": "t", "valid": "v"}}, "train": {"max_time": -3}})
