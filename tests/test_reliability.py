"""The reliability contract, one test per row of README's "Guarantees" (rows 1-19), on CPU.

Training rows use a tiny model on synthetic pairs through the real CLI; translation rows use an
untrained model built in-process (what it outputs does not matter, how many lines does).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import ROOT, synthetic_pairs, write_text_pair
from mtkit.checkpoint import load_checkpoint, save_checkpoint, step_checkpoints
from mtkit.config import config_from_dict, config_to_dict
from mtkit.data.corpus import decode_lines
from mtkit.data.shards import PreparedData
from mtkit.data.vocab import EOS, UNK
from mtkit.errors import UserError
from mtkit.model import Transformer
from mtkit.prepare import prepare
from mtkit.translate import Translator

ENV = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}


def mtkit(*args: str, cwd: Path, stdin: bytes | None = None, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mtkit", *args], cwd=cwd, input=stdin, capture_output=True,
                          env=ENV, timeout=300, **kw)


def one_error(proc: subprocess.CompletedProcess, *needles: str) -> str:
    """Exit 2, no traceback, exactly one error line, containing every needle."""
    err = proc.stderr.decode() if isinstance(proc.stderr, bytes) else proc.stderr
    lines = [line for line in err.splitlines() if line.startswith("mtkit: error:")]
    assert proc.returncode == 2 and "Traceback" not in err and len(lines) == 1, err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def raw_config(work: Path, **train) -> dict:
    return {
        "data": {"format": "text", "dir": str(work),
                 "splits": {"train": "train.{lang}", "valid": "valid.{lang}"},
                 "src_lang": "xx", "tgt_lang": "yy", "prepared_dir": str(work / "prepared")},
        "tokenizer": {"vocab_size": 320, "byte_fallback": True},
        "model": {"d_model": 32, "n_heads": 2, "d_ff": 64, "n_layers": 1, "dropout": 0.1,
                  "max_positions": 64},
        "train": {"max_tokens": 300, "max_steps": 12, "warmup_steps": 4, "log_every": 1, "valid_every": 4,
                  "valid_bleu_sentences": 4, "precision": "fp32", "device": "cpu", "threads": 1, "seed": 5,
                  "run_dir": str(work / "run"), **train},
        "decode": {"beam_size": 2, "max_len_offset": 5},
    }


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    """Synthetic corpus, prepared once; run.yaml trains 12 steps with dropout on."""
    work = tmp_path_factory.mktemp("reliability")
    pairs = synthetic_pairs(600)
    write_text_pair(work, "train", pairs)
    write_text_pair(work, "valid", pairs[:8])
    raw = raw_config(work)
    (work / "run.yaml").write_text(yaml.safe_dump(raw))
    prepare(config_from_dict(raw))
    return work


def train_log(run_dir: Path) -> list[tuple[int, float]]:
    records = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in records if "loss" in r]


@pytest.fixture(scope="module")
def trained(work) -> Path:
    """One uninterrupted 12-step run in work/run."""
    proc = mtkit("train", "run.yaml", cwd=work)
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    return work / "run"


@pytest.fixture(scope="module")
def translator(work) -> Translator:
    """An untrained model with the synthetic vocabulary, saved and loaded as a checkpoint."""
    cfg = config_from_dict(raw_config(work))
    data = PreparedData(cfg.data.prepared_dir)
    torch.manual_seed(0)
    model = Transformer(cfg.model, data.vocab.src_size, data.vocab.tgt_size)
    save_checkpoint({"model": model.state_dict(), "config": config_to_dict(cfg),
                     "vocab": data.vocab.to_state(), "step": 0}, work / "untrained.pt")
    return Translator.load(work / "untrained.pt", "cpu")


def test_01_sigkill_while_saving_leaves_the_previous_checkpoint_and_the_temp_is_cleaned(work, trained):
    ckpt_dir = trained / "checkpoints"
    target = step_checkpoints(ckpt_dir)[-1]
    before = load_checkpoint(target)["model"]
    script = ("import sys, time, torch\n"
              "from mtkit.checkpoint import save_checkpoint\n"
              "def slow(obj, f):\n    f.write(b'PK' * 5000); f.flush(); time.sleep(60)\n"
              "torch.save = slow\n"
              f"save_checkpoint({{'model': {{}}}}, {str(target)!r})\n")
    proc = subprocess.Popen([sys.executable, "-c", script], env=ENV)
    deadline = time.time() + 60
    while not list(ckpt_dir.glob(".*.tmp")) and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert list(ckpt_dir.glob(".*.tmp")), "the killed save should have left its temporary file"
    after = load_checkpoint(target)["model"]
    assert all(torch.equal(after[k], before[k]) for k in before)
    restart = mtkit("train", "run.yaml", "--resume", cwd=work)  # max_steps already reached: starts, stops
    assert restart.returncode == 0, restart.stderr.decode()[-2000:]
    assert not list(ckpt_dir.glob(".*.tmp")) and b"removed" in restart.stderr


def test_02_file_size_limit_while_saving_is_one_line_and_keeps_the_old_checkpoints(work, trained):
    import resource

    newest = step_checkpoints(trained / "checkpoints")[-1]
    limit = newest.stat().st_size // 2  # a step checkpoint no longer fits; the log lines do

    def small_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    proc = mtkit("train", "run.yaml", "--resume", "--set", "train.max_steps=16", cwd=work,
                 preexec_fn=small_files)
    one_error(proc, "step_00000016.pt", "cannot write checkpoint", "untouched")
    assert step_checkpoints(trained / "checkpoints")[-1] == newest
    assert load_checkpoint(newest)["step"] == 12
    assert not list((trained / "checkpoints").glob(".*.tmp"))
    for line in (trained / "log.jsonl").read_text().splitlines():
        json.loads(line)  # the log stays whole too


@pytest.mark.parametrize("damage", ["truncated", "empty", "random"])
def test_03_a_damaged_checkpoint_names_itself_and_the_newest_good_one(trained, damage):
    good = step_checkpoints(trained / "checkpoints")[-1]
    data = good.read_bytes()
    bad = trained / "checkpoints" / "step_00000099.pt"
    bad.write_bytes({"truncated": data[: len(data) // 2], "empty": b"", "random": os.urandom(4096)}[damage])
    try:
        with pytest.raises(UserError) as err:
            load_checkpoint(bad)
        assert str(bad) in str(err.value) and f"newest loadable checkpoint here: {good}" in str(err.value)
        proc = mtkit("translate", "-m", str(bad), cwd=trained, stdin=b"the dog\n")
        one_error(proc, str(bad), good.name)
    finally:
        bad.unlink()


class _Payload:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_04_a_checkpoint_carrying_a_pickle_payload_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "payload-ran"
    path = tmp_path / "evil.pt"
    torch.save({"model": {"w": torch.zeros(1)}, "config": _Payload(str(marker)), "vocab": {}}, path)
    with pytest.raises(UserError, match="evil.pt: not a loadable mtkit checkpoint"):
        load_checkpoint(path)
    assert not marker.exists()


def test_05_resume_after_a_kill_gives_the_same_losses_bit_for_bit(work, trained):
    longer = {"max_steps": 40, "valid_every": 10}
    cfg = raw_config(work, run_dir=str(work / "full"), **longer)
    (work / "full.yaml").write_text(yaml.safe_dump(cfg))
    assert mtkit("train", "full.yaml", cwd=work).returncode == 0
    cfg["train"]["run_dir"] = str(work / "killed")
    (work / "killed.yaml").write_text(yaml.safe_dump(cfg))
    proc = subprocess.Popen([sys.executable, "-m", "mtkit", "train", "killed.yaml"], cwd=work, env=ENV,
                            stderr=subprocess.DEVNULL)
    first = work / "killed" / "checkpoints" / "step_00000010.pt"
    while not first.exists() and proc.poll() is None:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    resumed = mtkit("train", "killed.yaml", "--resume", cwd=work)
    assert resumed.returncode == 0, resumed.stderr.decode()[-2000:]
    full, again = train_log(work / "full"), train_log(work / "killed")
    assert [s for s, _ in again] == list(range(1, 41))
    assert again == full  # exact float equality, dropout on
    w1 = load_checkpoint(work / "full" / "checkpoints" / "step_00000040.pt")["model"]
    w2 = load_checkpoint(work / "killed" / "checkpoints" / "step_00000040.pt")["model"]
    assert all(torch.equal(w1[k], w2[k]) for k in w1)


def test_06_resume_with_a_changed_config_lists_the_keys_unless_forced(work, trained):
    proc = mtkit("train", "run.yaml", "--resume", "--set", "model.d_ff=128",
                 "--set", "train.label_smoothing=0.2", cwd=work)
    one_error(proc, "model.d_ff", "train.label_smoothing", "--force")
    forced = mtkit("train", "run.yaml", "--resume", "--force", "--set", "train.label_smoothing=0.2", cwd=work)
    assert forced.returncode == 0, forced.stderr.decode()[-2000:]
    wrong = mtkit("train", "run.yaml", "--resume", "--force", "--set", "model.d_ff=128", cwd=work)
    one_error(wrong, "do not fit")


def test_07_empty_and_blank_lines_give_one_empty_line_each(translator):
    out = translator.translate(["the dog", "", "   ", "\t", "a cat runs", "\u3000"])
    assert len(out) == 6 and out[1] == out[2] == out[3] == out[5] == ""


def test_08_a_line_far_beyond_the_model_limit_is_chunked_into_one_line(work, translator):
    long_line = " ".join(["the small dog runs in the red house"] * 60)  # hundreds of subwords, limit 64
    proc = mtkit("translate", "-m", "untrained.pt", cwd=work, stdin=f"the dog\n{long_line}\na cat\n".encode())
    assert proc.returncode == 0
    assert len(proc.stdout.decode().split("\n")) == 4  # three lines and the final newline
    assert b"exceed the model's limit" in proc.stderr


def test_09_lines_are_counted_by_newline_only(work, translator):
    data = b"the dog\r\nred\rblue house\nsmall\xe2\x80\xa8cat\n\x0cthe man\n\n"
    proc = mtkit("translate", "-m", "untrained.pt", cwd=work, stdin=data)
    assert proc.returncode == 0
    assert proc.stdout.count(b"\n") == data.count(b"\n") == 5  # `wc -l` of input and output agree


def test_10_invalid_utf8_names_the_line_or_is_replaced_on_request(work, translator):
    data = b"the dog\nbad \xff\xfe cat\nthe man\n"
    one_error(mtkit("translate", "-m", "untrained.pt", cwd=work, stdin=data),
              "<stdin>: line 2: invalid UTF-8")
    proc = mtkit("translate", "-m", "untrained.pt", "--errors", "replace", cwd=work, stdin=data)
    assert proc.returncode == 0 and proc.stdout.count(b"\n") == 3
    assert b"replaced by U+FFFD in 1 line(s), first line 2" in proc.stderr


def test_11_characters_never_seen_in_training_are_translated(translator):
    lines = ["the dog 🐕", "Привет мир", "中文 العربية", "\u0301\u200d"]
    ids = translator.vocab.encode_src(lines)
    assert all(UNK not in row for row in ids)  # byte fallback spells them in bytes
    assert len(translator.translate(lines)) == 4


def test_12_prepare_with_mismatched_counts_names_both_and_writes_nothing(tmp_path):
    write_text_pair(tmp_path, "train", synthetic_pairs(30))
    (tmp_path / "train.yy").write_text("one\ntwo\n")
    raw = raw_config(tmp_path)
    raw["data"]["splits"]["valid"] = "train.{lang}"
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(raw))
    one_error(mtkit("prepare", "run.yaml", cwd=tmp_path), "has 30 lines", "has 2")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.yaml", "train.xx", "train.yy"]


def test_13_evaluate_with_mismatched_counts_fails_before_scoring(tmp_path):
    (tmp_path / "ref.txt").write_text("a\nb\nc\n")
    proc = mtkit("evaluate", "--ref", "ref.txt", "--json", cwd=tmp_path, stdin=b"a\nb\n")
    one_error(proc, "has 2 lines", "ref.txt has 3")
    assert proc.stdout == b""


def _biased(translator: Translator, token: int, value: float) -> None:
    """Add `value` to one output logit at every step (an untrained model gone extreme)."""
    decode = translator.model.decode

    def patched(*args, **kwargs):
        logits = decode(*args, **kwargs)
        logits[..., token] += value
        return logits

    translator.model.decode = patched


def test_14_degenerate_models_still_give_one_line_per_input(work, translator):
    lines = ["the dog runs", "", "a small red house on the street", "cat"]
    eos_first = Translator.load(work / "untrained.pt", "cpu")
    _biased(eos_first, EOS, 1e4)
    assert eos_first.translate(lines) == ["", "", "", ""]
    never_ends = Translator.load(work / "untrained.pt", "cpu")
    _biased(never_ends, EOS, float("-inf"))
    for beam in (1, 2):
        never_ends.decode.beam_size = beam
        out = never_ends.translate(lines)
        assert len(out) == 4 and out[1] == ""  # the others: whatever ran to the length limit
    nbest = never_ends.translate_nbest(lines, 2)
    assert len(nbest) == 4 and all(1 <= len(h) <= 2 for h in nbest)


def test_15_non_finite_losses_are_skipped_then_stop_the_run_and_never_reach_a_checkpoint(work, monkeypatch):
    import mtkit.engine as engine
    from mtkit.train import train

    real, calls = engine.label_smoothed_loss, {"n": 0}

    def poisoned(logits, target, epsilon):
        calls["n"] += 1
        loss, nll = real(logits, target, epsilon)
        return (loss * float("nan"), nll) if calls["n"] > 5 else (loss, nll)

    monkeypatch.setattr(engine, "label_smoothed_loss", poisoned)
    cfg = config_from_dict(raw_config(work, run_dir=str(work / "nan"), max_steps=40))
    with pytest.raises(UserError, match="10 non-finite steps in a row"):
        train(cfg)
    records = [json.loads(line) for line in (work / "nan" / "log.jsonl").read_text().splitlines()]
    assert [r["skipped_steps"] for r in records if "loss" in r] == [0] * 5 + [1] * 10
    for path in step_checkpoints(work / "nan" / "checkpoints"):
        assert all(torch.isfinite(v).all() for v in load_checkpoint(path)["model"].values())


def test_16_the_same_seed_and_config_give_identical_checkpoints_and_outputs(work, trained):
    raw = raw_config(work, run_dir=str(work / "twin"))
    (work / "twin.yaml").write_text(yaml.safe_dump(raw))
    assert mtkit("train", "twin.yaml", cwd=work).returncode == 0
    a = load_checkpoint(trained / "checkpoints" / "best.pt")
    b = load_checkpoint(work / "twin" / "checkpoints" / "best.pt")
    assert a["step"] == b["step"] and all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    src = b"the dog runs\na small cat\n\nred house\n"
    out = [mtkit("translate", "-m", str(d), cwd=work, stdin=src).stdout for d in (trained, work / "twin")]
    assert out[0] == out[1] and out[0].count(b"\n") == 4


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.text(st.characters(blacklist_characters="\n", blacklist_categories=("Cs",)), max_size=40),
                max_size=6))
def test_17_random_lines_never_crash_and_keep_their_count(translator, lines):
    out = translator.translate(lines)
    assert len(out) == len(lines) and all("\n" not in line for line in out)


@given(st.binary(max_size=200))
def test_17_random_bytes_split_into_newline_counted_lines(data):
    lines = decode_lines(data + b"\n", "<bytes>", errors="replace")
    assert len(lines) == (data + b"\n").count(b"\n")


def _interrupt_when(proc: subprocess.Popen, ready) -> None:
    while not ready() and proc.poll() is None:
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=120)


def test_18_ctrl_c_in_prepare_or_train_leaves_nothing_half_written(tmp_path, work, trained):
    write_text_pair(tmp_path, "train", synthetic_pairs(60000))
    write_text_pair(tmp_path, "valid", synthetic_pairs(10))
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(raw_config(tmp_path)))
    proc = subprocess.Popen([sys.executable, "-m", "mtkit", "prepare", "run.yaml"], cwd=tmp_path, env=ENV,
                            stderr=subprocess.PIPE)
    os.set_blocking(proc.stderr.fileno(), False)
    seen = bytearray()
    _interrupt_when(proc, lambda: seen.extend(proc.stderr.read() or b"") or b"training SentencePiece" in seen)
    assert proc.returncode == 130
    assert not (tmp_path / "prepared").exists() and not list(tmp_path.glob(".prepared*"))

    cfg = raw_config(work, run_dir=str(work / "interrupted"), max_steps=400, valid_every=5)
    (work / "interrupted.yaml").write_text(yaml.safe_dump(cfg))
    proc = subprocess.Popen([sys.executable, "-m", "mtkit", "train", "interrupted.yaml"], cwd=work, env=ENV,
                            stderr=subprocess.DEVNULL)
    ckpt_dir = work / "interrupted" / "checkpoints"
    _interrupt_when(proc, lambda: len(step_checkpoints(ckpt_dir)) >= 2)
    assert proc.returncode == 130
    assert not list(ckpt_dir.glob(".*.tmp"))
    for path in [*step_checkpoints(ckpt_dir), ckpt_dir / "best.pt"]:
        load_checkpoint(path)  # every file there is whole


def test_19_missing_or_wrong_paths_are_one_line_naming_them(work, trained, tmp_path):
    one_error(mtkit("translate", "-m", str(trained), "--input", "nowhere.txt", cwd=work),
              "nowhere.txt: file not found")
    (tmp_path / "a-file").write_text("x")
    proc = mtkit("translate", "-m", str(trained), "--output", str(tmp_path / "a-file" / "out.txt"), cwd=work,
                 stdin=b"the dog\n")
    one_error(proc, str(tmp_path / "a-file" / "out.txt"), "cannot write")
    one_error(mtkit("translate", "-m", str(trained), "--input", str(tmp_path), cwd=work), str(tmp_path))
    raw = raw_config(tmp_path / "missing-dir")
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(raw))
    one_error(mtkit("prepare", "bad.yaml", cwd=tmp_path), str(tmp_path / "missing-dir" / "train.xx"))
    raw["data"]["prepared_dir"] = str(tmp_path / "a-file")
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(raw))
    one_error(mtkit("train", "bad.yaml", cwd=tmp_path), str(tmp_path / "a-file"), "mtkit prepare")
    one_error(mtkit("evaluate", "--ref", "no-ref.txt", cwd=tmp_path, stdin=b"x\n"),
              "no-ref.txt: file not found")
