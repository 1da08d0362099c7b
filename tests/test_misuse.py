"""Misuse that must lose nothing and print one line: run-directory locks, prepare --force, best.pt
after a kill, a rebuilt vocabulary, stale logs, OS errors, bad values that used to pass the loader,
a dead or stuck worker process. One test per case of README's guarantees 20-32."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
import yaml

from conftest import synthetic_pairs, write_text_pair
from mtkit.checkpoint import BEST, load_checkpoint, save_checkpoint, step_checkpoints
from mtkit.config import config_from_dict, load_config
from mtkit.errors import UserError
from mtkit.train import LOCK
from mtkit.translate import Translator
from test_reliability import ENV, mtkit, one_error, raw_config


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    """A synthetic corpus, prepared once; run.yaml trains 12 steps, validating every 4."""
    work = tmp_path_factory.mktemp("misuse")
    pairs = synthetic_pairs(500)
    write_text_pair(work, "train", pairs)
    write_text_pair(work, "valid", pairs[:8])
    (work / "run.yaml").write_text(yaml.safe_dump(raw_config(work)))
    assert mtkit("prepare", "run.yaml", cwd=work).returncode == 0
    return work


@pytest.fixture(scope="module")
def trained(work) -> Path:
    proc = mtkit("train", "run.yaml", cwd=work)
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    return work / "run"


def listing(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*"))
            if p.is_file()}


# 20. prepare --force replaces only what prepare made, and only once the new one is complete.

@pytest.mark.parametrize("target", ["corpus", "cwd", "unrelated"])
def test_20_prepare_force_refuses_a_directory_it_did_not_make(work, tmp_path, target):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    write_text_pair(corpus, "train", synthetic_pairs(40))
    (tmp_path / "notes.txt").write_text("keep me\n")
    other = tmp_path / "unrelated"
    other.mkdir()
    (other / "thesis.tex").write_text("years of work\n")
    raw = raw_config(corpus)
    raw["data"]["splits"]["valid"] = "train.{lang}"
    raw["data"]["prepared_dir"] = {"corpus": str(corpus), "cwd": ".", "unrelated": str(other)}[target]
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(raw))
    before = listing(tmp_path)
    one_error(mtkit("prepare", "run.yaml", "--force", cwd=tmp_path), "not a prepared directory", "--force")
    assert listing(tmp_path) == before


def test_20_a_failed_prepare_force_keeps_the_old_prepared_directory(work, tmp_path):
    write_text_pair(tmp_path, "train", synthetic_pairs(60))
    raw = raw_config(tmp_path)
    raw["data"]["splits"]["valid"] = "train.{lang}"
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(raw))
    assert mtkit("prepare", "run.yaml", cwd=tmp_path).returncode == 0
    before = listing(tmp_path / "prepared")
    (tmp_path / "train.yy").write_text("one line only\n")  # the rebuild fails half-way
    one_error(mtkit("prepare", "run.yaml", "--force", cwd=tmp_path), "has 60 lines", "has 1")
    assert listing(tmp_path / "prepared") == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prepared", "run.yaml", "train.xx", "train.yy"]


def test_20_prepare_removes_what_a_killed_prepare_left(work, tmp_path):
    write_text_pair(tmp_path, "train", synthetic_pairs(60))
    raw = raw_config(tmp_path)
    raw["data"]["splits"]["valid"] = "train.{lang}"
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(raw))
    stray = tmp_path / ".prepared.12345.tmp"  # io.atomic_dir names its directories so
    stray.mkdir()
    (stray / "train.src.00000.bin").write_bytes(b"\0" * 100)
    proc = mtkit("prepare", "run.yaml", cwd=tmp_path)
    assert proc.returncode == 0 and b"left by an interrupted prepare" in proc.stderr
    assert not stray.exists() and (tmp_path / "prepared" / "manifest.json").is_file()


def wait_until(ready, seconds: float) -> None:
    """Poll `ready()` until it is true or `seconds` have passed (the caller asserts what it needs)."""
    deadline = time.time() + seconds
    while not ready() and time.time() < deadline:
        time.sleep(0.05)


# 21. One process per run directory.

def test_21_a_second_train_on_a_busy_run_directory_is_refused_with_the_holders_pid(work, tmp_path):
    args = ["train", "run.yaml", "--set", f"train.run_dir={tmp_path / 'busy'}",
            "--set", "train.max_steps=100000", "--set", "train.max_time=60",
            "--set", "train.valid_every=100000"]
    err = tmp_path / "first.err"  # a file, not a pipe: a full pipe nobody reads would block the run
    with err.open("wb") as f:
        first = subprocess.Popen([sys.executable, "-m", "mtkit", *args], cwd=work, env=ENV,
                                 stdout=subprocess.DEVNULL, stderr=f)
    try:
        wait_until(lambda: (tmp_path / "busy" / "log.jsonl").exists(), 60)
        for extra in ([], ["--force"], ["--resume", "--force"]):
            line = one_error(mtkit(*args, *extra, cwd=work), str(tmp_path / "busy"), "in use",
                             f"pid {first.pid}")
            assert "--force does not override" in line
        assert first.poll() is None  # the first run goes on, untouched
    finally:
        first.send_signal(signal.SIGINT)
        first.wait(timeout=60)
    assert first.returncode == 130, err.read_text()[-2000:]
    # the lock dies with its holder: a SIGKILLed run leaves none behind
    second = subprocess.Popen([sys.executable, "-m", "mtkit", *args, "--force"], cwd=work, env=ENV,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    lock = tmp_path / "busy" / LOCK
    wait_until(lambda: lock.exists() and lock.read_text().strip() == str(second.pid), 60)
    assert lock.read_text().strip() == str(second.pid)  # killed while holding the lock
    second.kill()
    second.wait()
    third = mtkit(*args, "--force", "--set", "train.max_time=1", cwd=work)
    assert third.returncode == 0, third.stderr.decode()[-1000:]


# 22. best.pt is the best validation's model, whatever was killed when.

def test_22_resume_rewrites_a_stale_best_checkpoint(work, trained):
    history = load_checkpoint(step_checkpoints(trained / "checkpoints")[-1])["train_state"]["history"]
    from mtkit.train import _best_step

    best_step = _best_step(history)
    other = next(p for p in step_checkpoints(trained / "checkpoints")
                 if load_checkpoint(p)["step"] != best_step)
    stale = load_checkpoint(other)
    stale.pop("train_state")
    save_checkpoint(stale, trained / "checkpoints" / BEST)  # as a kill between the two saves leaves it
    proc = mtkit("train", "run.yaml", "--resume", cwd=work)
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    assert b"rewrote" in proc.stderr
    assert load_checkpoint(trained / "checkpoints" / BEST)["step"] == best_step


# 23. A vocabulary rebuilt under a run is refused, --force or not.

def test_23_resume_after_the_data_was_prepared_with_another_vocabulary_is_refused(work, tmp_path):
    raw = raw_config(work, run_dir=str(tmp_path / "run"))
    raw["data"]["prepared_dir"] = str(tmp_path / "prepared")
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(raw))
    assert mtkit("prepare", "run.yaml", cwd=tmp_path).returncode == 0
    assert mtkit("train", "run.yaml", "--set", "train.max_steps=4", cwd=tmp_path).returncode == 0
    rebuilt = ["--set", "tokenizer.seed=7", "--set", "tokenizer.type=unigram"]  # same size, other pieces
    assert mtkit("prepare", "run.yaml", "--force", *rebuilt, cwd=tmp_path).returncode == 0
    for extra in ([], ["--force"]):
        one_error(mtkit("train", "run.yaml", "--resume", *extra, cwd=tmp_path), "vocabulary", "fingerprint",
                  "prepared again")


# 24. A fresh start in a run directory without checkpoints starts a fresh log.

def test_24_a_fresh_start_does_not_append_to_a_dead_runs_log(work, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "log.jsonl").write_text("".join(json.dumps({"step": s, "loss": 9.0}) + "\n" for s in (1, 2, 3)))
    proc = mtkit("train", "run.yaml", "--set", f"train.run_dir={run}", "--set", "train.max_steps=4", cwd=work)
    assert proc.returncode == 0
    steps = [json.loads(line)["step"] for line in (run / "log.jsonl").read_text().splitlines()]
    assert (steps == sorted(steps) and steps.count(1) == 1
            and not any(json.loads(line).get("loss") == 9.0
                        for line in (run / "log.jsonl").read_text().splitlines()))


# 25. Operating-system errors are one line naming the file and the cause, and leave no half-file.

def test_25_a_file_size_limit_while_writing_the_config_leaves_no_half_file(work, tmp_path):
    import resource

    def tiny_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (500, 500))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)

    run = tmp_path / "run"
    proc = mtkit("train", "run.yaml", "--set", f"train.run_dir={run}", cwd=work, preexec_fn=tiny_files)
    one_error(proc, str(run / "config.yaml"), "file too large")
    assert not (run / "config.yaml").exists() and not list(run.glob(".*.tmp"))


def test_25_a_gz_corpus_corrupted_mid_stream_names_the_file(tmp_path):
    pairs = synthetic_pairs(3000, seed=3)
    write_text_pair(tmp_path, "train", pairs, gz=True)
    data = bytearray((tmp_path / "train.yy.gz").read_bytes())
    data[len(data) // 2: len(data) // 2 + 64] = b"\xff" * 64
    (tmp_path / "train.yy.gz").write_bytes(bytes(data))
    raw = raw_config(tmp_path)
    raw["data"]["splits"] = {"train": "train.{lang}.gz", "valid": "train.{lang}.gz"}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(raw))
    one_error(mtkit("prepare", "run.yaml", cwd=tmp_path), "train.yy.gz", "cannot read")
    assert not (tmp_path / "prepared").exists()


def test_25_an_os_error_on_a_user_path_is_one_line(work, tmp_path):
    code = ("import errno, os, sys, mtkit.cli as c, mtkit.evaluate as e\n"
            "def full(*a, **k):\n"
            "    raise OSError(errno.EROFS, 'Read-only file system', 'runs/x/log.jsonl')\n"
            "e.score = full\n"
            "sys.argv = ['mtkit', 'evaluate', '--ref', 'r.txt', '--hyp', 'r.txt']\n"
            "c.run()\n")
    (tmp_path / "r.txt").write_text("a\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, env=ENV,
                          timeout=120)
    one_error(proc, "runs/x/log.jsonl", "read-only file system")


# 26. Checkpoints that load but cannot translate, and averaging across models.

def test_26_a_checkpoint_whose_config_disagrees_with_its_weights_is_one_line(trained, tmp_path):
    ckpt = load_checkpoint(step_checkpoints(trained / "checkpoints")[-1])
    ckpt["config"]["model"]["d_ff"] = 128
    save_checkpoint(ckpt, tmp_path / "mismatch.pt")
    one_error(mtkit("translate", "-m", str(tmp_path / "mismatch.pt"), cwd=tmp_path, stdin=b"the dog\n"),
              "mismatch.pt", "weights do not fit")
    ckpt["config"]["model"]["d_ff"] = 64
    ckpt["vocab"] = {"src": b"not a sentencepiece model", "tgt": None}
    save_checkpoint(ckpt, tmp_path / "badvocab.pt")
    one_error(mtkit("translate", "-m", str(tmp_path / "badvocab.pt"), cwd=tmp_path, stdin=b"the dog\n"),
              "badvocab.pt", "vocabulary", "not a SentencePiece model")


def test_26_averaging_checkpoints_of_different_shapes_is_one_line(trained, tmp_path):
    ckpt = load_checkpoint(step_checkpoints(trained / "checkpoints")[-1])
    (tmp_path / "checkpoints").mkdir()
    save_checkpoint(ckpt, tmp_path / "checkpoints" / "step_00000001.pt")
    ckpt["model"]["encoder.0.ffn.w1.weight"] = torch.zeros(3, 3)
    save_checkpoint(ckpt, tmp_path / "checkpoints" / "step_00000002.pt")
    one_error(mtkit("average", str(tmp_path), "--last", "2", cwd=tmp_path), "step_00000002.pt", "shapes")


def test_26_evaluating_empty_files_is_one_line(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    one_error(mtkit("evaluate", "--ref", "empty.txt", "--hyp", "empty.txt", cwd=tmp_path), "no lines")


# 27. Values that passed the loader and failed later are refused at load, or before any work.

@pytest.mark.parametrize("key, value, needle", [
    ("train.valid_bleu_sentences", 0, "train.valid_bleu_sentences must be >= 1"),
    ("decode.max_len_offset", -1, "decode.max_len_offset must be >= 0"),
    ("train.lr_factor", float("nan"), "train.lr_factor must be a positive number"),
    ("train.adam_betas", [0.9, 1.5], "train.adam_betas must be two numbers in [0, 1)"),
])
def test_27_values_that_would_fail_later_are_refused_at_load(key, value, needle):
    section, name = key.split(".")
    raw = {"data": {"splits": {"train": "t", "valid": "v"}}, section: {name: value}}
    with pytest.raises(UserError, match=needle.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        config_from_dict(raw)


def test_27_an_empty_validation_split_or_short_positions_are_one_line_before_training(work, tmp_path):
    write_text_pair(tmp_path, "train", synthetic_pairs(60))
    write_text_pair(tmp_path, "valid", [])
    raw = raw_config(tmp_path)
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(raw))
    assert mtkit("prepare", "run.yaml", cwd=tmp_path).returncode == 0
    one_error(mtkit("train", "run.yaml", cwd=tmp_path), "validation split is empty")
    one_error(mtkit("train", "run.yaml", "--set", "model.max_positions=4", cwd=work),
              "model.max_positions (4)", "longest sentence")
    assert not (tmp_path / "run").exists()


def test_27_non_finite_weights_stop_before_validation_with_the_divergence_line(work, monkeypatch):
    import mtkit.train as train_module

    real = train_module.train_step

    def poison(step_model, optimizer, *args, **kwargs):
        out = real(step_model, optimizer, *args, **kwargs)
        with torch.no_grad():
            next(step_model.parameters()).fill_(float("inf"))
        return out

    monkeypatch.setattr(train_module, "train_step", poison)
    cfg = config_from_dict(raw_config(work, run_dir=str(work / "diverged"), max_steps=4))
    with pytest.raises(UserError, match="training diverged: non-finite weights"):
        train_module.train(cfg)
    assert not step_checkpoints(work / "diverged" / "checkpoints")


# 28. A worker process that dies, or hangs, never leaves the command hanging or a traceback.

def _sleeping_search(job):
    time.sleep(600)


def _dying_search(job):
    os.kill(os.getpid(), signal.SIGKILL)


@pytest.fixture(scope="module")
def untrained(tmp_path_factory) -> Path:
    from conftest import untrained_checkpoint

    return untrained_checkpoint(tmp_path_factory.mktemp("untrained"))


def test_28_a_killed_worker_is_one_error_and_the_pool_is_gone(untrained):
    translator = Translator.load(untrained, "cpu", workers=2, max_tokens=40)
    translator._pool.task = _dying_search  # what the forked workers will run
    with pytest.raises(UserError, match="decoding worker process died"):
        translator.translate(["the dog runs on the street"] * 40)
    assert not translator._pool.started


def test_28_closing_a_pool_whose_workers_hang_returns_in_seconds(untrained):
    translator = Translator.load(untrained, "cpu", workers=2, max_tokens=40)
    translator._pool.task = _sleeping_search
    errors = []

    def translate() -> None:
        try:
            translator.translate(["the dog runs"] * 40)
        except Exception as exc:  # whatever the stopped pool raises: what matters is that it returns
            errors.append(exc)

    worker = threading.Thread(target=translate, daemon=True)
    worker.start()
    wait_until(lambda: translator._pool.started, 30)
    time.sleep(0.5)
    began = time.time()
    translator.close()
    assert time.time() - began < 10
    worker.join(10)
    assert not worker.is_alive() and errors


def test_28_a_model_whose_scores_are_nan_still_gives_one_line_per_input(untrained):
    translator = Translator.load(untrained, "cpu")
    with torch.no_grad():
        translator.model.tgt_embed.tokens.weight.fill_(float("nan"))
    lines = ["the dog runs", "", "a red house on the street"]
    assert translator.translate(lines) == ["", "", ""]
    assert [len(n) for n in translator.translate_nbest(lines, 2)] == [1, 1, 1]


# 29-32. Smaller promises.

def test_29_a_moved_run_directory_resumes_without_force(work, trained, tmp_path):
    moved = tmp_path / "moved"
    import shutil

    shutil.copytree(trained, moved)
    proc = mtkit("train", "run.yaml", "--resume", "--set", f"train.run_dir={moved}", cwd=work)
    assert proc.returncode == 0, proc.stderr.decode()[-1000:]
    assert b"resumed from" in proc.stderr


def test_30_exponents_without_a_dot_are_numbers(tmp_path):
    (tmp_path / "c.yaml").write_text("data: {splits: {train: t, valid: v}}\n"
                                     "train: {lr_factor: 1e0, adam_eps: 1e-9}\n")
    cfg = load_config(tmp_path / "c.yaml", ["train.max_time=1e3"])
    assert cfg.train.adam_eps == 1e-9 and cfg.train.lr_factor == 1.0 and cfg.train.max_time == 1000.0


def test_31_checkpoints_follow_the_umask(tmp_path, trained):
    old = os.umask(0o022)
    try:
        save_checkpoint(load_checkpoint(step_checkpoints(trained / "checkpoints")[-1]), tmp_path / "c.pt")
    finally:
        os.umask(old)
    assert (tmp_path / "c.pt").stat().st_mode & 0o777 == 0o644


def test_32_a_refused_pickle_says_it_never_ran_and_never_advises_unsafe_loading(tmp_path):
    class Payload:
        def __reduce__(self):
            return (os.system, ("touch pwned",))

    torch.save({"model": Payload(), "config": {}, "vocab": {}}, tmp_path / "evil.pt")
    with pytest.raises(UserError) as error:
        load_checkpoint(tmp_path / "evil.pt")
    message = str(error.value)
    assert "never ran" in message and "system" in message and "weights_only" not in message
    assert not (tmp_path / "pwned").exists()
