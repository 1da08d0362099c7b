"""Hostile input, generated (hypothesis): configs, command-line values and files that a careless or
hostile user could give. Whatever they are, a command exits 0, 2 (one error line) or 130, never
with a traceback, and changes nothing outside its own prepared and run directories."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from conftest import synthetic_pairs, untrained_checkpoint, write_text_pair
from mtkit.cli import app

SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))

# Values of every kind a YAML override can carry, the awkward ones included.
VALUES = st.one_of(
    st.integers(-3, 8), st.floats(0, 1), st.sampled_from([2**31, 2**62, 2**63, -(2**63), 10**30]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(), st.none(), st.text(max_size=12), st.lists(st.integers(-2, 3), max_size=3),
    st.dictionaries(st.text(max_size=4), st.integers(), max_size=2),
    st.sampled_from(["auto", "15m", "1e9", "1e-9", "-1", "0", "..", "/", "{lang}", "~", "nan"]))

KEYS = [
    "data.src_lang", "data.format", "data.dir", "data.splits", "data.src_field", "data.prepared_dir",
    "data.max_tokens_per_sentence", "data.max_length_ratio", "data.dedup", "data.num_proc", "data.shard_size",
    "tokenizer.type", "tokenizer.vocab_size", "tokenizer.joint", "tokenizer.character_coverage",
    "tokenizer.byte_fallback", "tokenizer.input_sentence_size", "tokenizer.seed",
    "model.d_model", "model.n_heads", "model.d_ff", "model.n_layers", "model.dropout",
    "model.attention_dropout", "model.norm", "model.share_embeddings", "model.max_positions",
    "train.run_dir", "train.seed", "train.max_tokens", "train.accum_steps", "train.pool_size",
    "train.max_epochs", "train.lr_factor", "train.warmup_steps", "train.lr_decay", "train.adam_betas",
    "train.adam_eps", "train.weight_decay", "train.label_smoothing", "train.clip_norm", "train.valid_every",
    "train.valid_bleu_sentences", "train.log_every", "train.keep_last", "train.patience", "train.device",
    "train.precision", "train.threads", "train.compile", "train.max_time",
    "decode.beam_size", "decode.length_penalty", "decode.max_len_offset",
    "decode.max_tokens", "decode.stopping", "decode.early_exit", "model.nonsense", "nonsense",
]


def invoke(*args: str, stdin: str | None = None):
    return CliRunner().invoke(app, list(args), input=stdin, catch_exceptions=True)


def assert_clean(result, allowed=(0, 2, 130)) -> None:
    """No exception escaped (a traceback), the exit code is one of the promised ones, and an error
    is one line."""
    exc = result.exception
    assert exc is None or isinstance(exc, SystemExit), f"traceback: {exc!r}\n{result.output[-2000:]}"
    assert result.exit_code in allowed, result.output[-2000:]
    if result.exit_code == 2:
        errors = [line for line in result.output.splitlines()
                  if line.startswith(("mtkit: error:", "Error", "Usage"))]
        assert errors, result.output[-2000:]


def snapshot(directory: Path, own: tuple[str, ...]) -> dict[str, bytes]:
    """Every file under `directory` outside the command's own directories."""
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*"))
            if p.is_file() and not p.relative_to(directory).parts[0].startswith(own)}


def yaml_value(value) -> str:
    if isinstance(value, float) and not math.isfinite(value):
        return ".nan" if math.isnan(value) else (".inf" if value > 0 else "-.inf")
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("hostile")
    pairs = synthetic_pairs(200)
    write_text_pair(work, "train", pairs)
    write_text_pair(work, "valid", pairs[:5])
    raw = {"data": {"dir": ".", "splits": {"train": "train.{lang}", "valid": "valid.{lang}"},
                    "src_lang": "xx", "tgt_lang": "yy", "prepared_dir": "prepared"},
           "tokenizer": {"vocab_size": 300},
           "model": {"d_model": 16, "n_heads": 2, "d_ff": 32, "n_layers": 1, "max_positions": 64},
           "train": {"max_tokens": 200, "max_steps": 2, "warmup_steps": 2, "valid_every": 2,
                     "valid_bleu_sentences": 2, "device": "cpu", "threads": 1, "run_dir": "run"},
           "decode": {"beam_size": 2, "max_len_offset": 4}}
    (work / "run.yaml").write_text(yaml.safe_dump(raw))
    return work


@settings(SETTINGS, max_examples=80)
@given(overrides=st.lists(st.tuples(st.sampled_from(KEYS), VALUES), min_size=1, max_size=2))
@example(overrides=[("data.prepared_dir", 4)])
@example(overrides=[("data.prepared_dir", 4), ("tokenizer.seed", 2)])  # the same directory, prepared again
def test_generated_configs_prepare_and_train_cleanly(work, overrides, monkeypatch):
    monkeypatch.chdir(work)
    sets = [item for key, value in overrides for item in ("--set", f"{key}={yaml_value(value)}")]
    # Bounds that keep every example short, whatever was generated above (the last --set wins).
    bounds = ["--set", "train.max_steps=2", "--set", "train.max_time=10", "--set", "train.max_epochs=2"]
    own = ("prepared", "run", ".prepared", "/")
    # a directory given as a number (prepared_dir: 4) is the config's text of it ("4")
    named = [str(v) for k, v in overrides if k in ("data.prepared_dir", "train.run_dir")
             and isinstance(v, (str, int, float)) and not isinstance(v, bool)]
    own += tuple(v for v in named if v not in ("", ".", "..", "/", "~", "{lang}")
                 and not v.startswith((".", "/")))
    before = snapshot(work, own)
    prepared = invoke("-q", "prepare", "run.yaml", *sets, "--force")
    assert_clean(prepared)
    if prepared.exit_code == 0:
        assert_clean(invoke("-q", "train", "run.yaml", *sets, *bounds, "--force"))
    after = snapshot(work, own)
    assert {k: after.get(k) for k in before} == before  # new outputs may appear; nothing else changed


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return untrained_checkpoint(tmp_path_factory.mktemp("hostile-model"))


OPTION_VALUES = st.sampled_from(["0", "-1", "1", "3", "99", "nan", "inf", "-inf", "x", "", "1e9", "2.5"])


@SETTINGS
@given(options=st.lists(st.tuples(st.sampled_from(
    ["--beam", "--length-penalty", "--nbest", "--max-tokens", "--window", "--layer", "--head", "--errors",
     "--workers", "--quantize", "--device"]), OPTION_VALUES), max_size=3),
       lines=st.lists(st.text(max_size=30), max_size=5))
def test_generated_translate_options_run_cleanly(model, options, lines):
    args = [item for option, value in options for item in (option, value)]
    result = invoke("-q", "translate", "-m", str(model), *args, stdin="".join(f"{x}\n" for x in lines))
    assert_clean(result)
    if result.exit_code == 0:
        assert result.stdout.count("\n") >= len(lines)


@SETTINGS
@given(text=st.text(max_size=300))
def test_generated_config_files_load_cleanly(tmp_path_factory, text):
    directory = tmp_path_factory.mktemp("yaml")
    (directory / "c.yaml").write_text(text, encoding="utf-8")
    before = snapshot(directory, ("prepared",))
    import os

    old = os.getcwd()
    os.chdir(directory)
    try:
        assert_clean(invoke("-q", "prepare", "c.yaml"))
    finally:
        os.chdir(old)
    assert snapshot(directory, ("prepared",)) == before


@SETTINGS
@given(data=st.binary(max_size=2000))
def test_generated_checkpoint_files_are_refused_cleanly(tmp_path_factory, data):
    path = tmp_path_factory.mktemp("ckpt") / "model.pt"
    path.write_bytes(data)
    result = invoke("-q", "translate", "-m", str(path), stdin="the dog\n")
    assert_clean(result, allowed=(2,))
