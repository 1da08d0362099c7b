"""Export to CTranslate2: a tiny trained model, post-norm and pre-norm, gives the same greedy
translations and the same per-token log-probabilities in CTranslate2 as in mtkit."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from conftest import synthetic_pairs, write_text_pair
from mtkit.checkpoint import load_checkpoint
from mtkit.config import config_from_dict
from mtkit.data.batching import pad
from mtkit.data.vocab import BOS, EOS
from mtkit.errors import UserError
from mtkit.export import ct2_translate, export_ctranslate2, load_ct2
from mtkit.prepare import prepare
from mtkit.train import train
from mtkit.translate import Translator

pytest.importorskip("ctranslate2", reason='CTranslate2 is not installed (pip install "mtkit[ct2]")')

N_TEST = 30


def raw_config(work: Path, norm: str) -> dict:
    """Two layers (so layer indexing is exercised), trained 300 steps on the reversal task: the outputs are
    partly right, and some repeat a word up to the length limit, which exercises the limit too."""
    return {
        "data": {"format": "text", "dir": str(work),
                 "splits": {"train": "train.{lang}", "valid": "valid.{lang}"},
                 "src_lang": "xx", "tgt_lang": "yy", "prepared_dir": str(work / "prepared")},
        "tokenizer": {"vocab_size": 120, "byte_fallback": False},
        "model": {"d_model": 32, "n_heads": 2, "d_ff": 64, "n_layers": 2, "dropout": 0.0, "max_positions": 64,
                  "norm": norm},
        "train": {"max_tokens": 600, "max_steps": 300, "warmup_steps": 60, "lr_factor": 0.5, "log_every": 100,
                  "valid_every": 300, "valid_bleu_sentences": 4, "precision": "fp32", "device": "cpu",
                  "threads": 1, "seed": 3, "compile": False, "run_dir": str(work / "run")},
        "decode": {"beam_size": 1, "max_len_offset": 10},
    }


@pytest.fixture(scope="module", params=["post", "pre"])
def trained(request, tmp_path_factory) -> tuple[Path, list[str]]:
    """(run directory, held-out source lines) of a model trained in-process."""
    work = tmp_path_factory.mktemp(f"export_{request.param}")
    write_text_pair(work, "train", synthetic_pairs(800))
    write_text_pair(work, "valid", synthetic_pairs(8, seed=1))
    cfg = config_from_dict(raw_config(work, request.param))
    prepare(cfg)
    threads = torch.get_num_threads()
    run_dir = train(cfg)  # sets torch's threads for the whole process (train.threads): undo that
    torch.set_num_threads(threads)
    return run_dir, [src for src, _ in synthetic_pairs(N_TEST, seed=2)]


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory) -> Path:
    return export_ctranslate2(trained[0], tmp_path_factory.mktemp("ct2") / "model")


def test_greedy_translations_equal_mtkit(trained, exported):
    run_dir, lines = trained
    ours = Translator.load(run_dir, "cpu", beam_size=1).translate(lines)
    theirs = ct2_translate(exported, lines, beam_size=1)
    assert len({t for t in ours if t}) > N_TEST // 2, f"model too weak for a meaningful test: {ours[:5]}"
    assert theirs == ours


def test_log_probs_equal_teacher_forced_mtkit(trained, exported):
    run_dir, lines = trained
    translator = Translator.load(run_dir, "cpu", beam_size=1)
    refs = [" ".join(w.upper() for w in reversed(line.split())) for line in lines]
    model = load_ct2(exported)
    scored = model.translator.score_batch([model.vocab.src.sp.encode(s, out_type=str) for s in lines],
                                          [model.vocab.tgt.sp.encode(t, out_type=str) for t in refs])
    src, tgt = translator.vocab.encode_src(lines), translator.vocab.encode_tgt(refs)
    with torch.no_grad():
        logp = translator.model(pad(src, suffix=EOS), pad(tgt, prefix=BOS)).log_softmax(-1)  # (B, T, V)
    tgt_out = pad(tgt, suffix=EOS)
    for i, result in enumerate(scored):
        n = len(tgt[i]) + 1  # target + EOS
        ours = logp[i, torch.arange(n), tgt_out[i, :n]]
        assert torch.allclose(torch.tensor(result.log_probs), ours, atol=1e-4), i


def test_directory_is_self_contained(trained, exported):
    info = json.loads((exported / "mtkit_export.json").read_text())
    state = load_checkpoint(Path(info["checkpoint"]))
    assert info["step"] == state["step"] == 300 and info["config"] == state["config"]
    assert (exported / "source.spm").read_bytes() == state["vocab"]["src"]
    assert json.loads((exported / "config.json").read_text())["add_source_eos"] is True
    assert ct2_translate(exported, ["", "the dog", "  "], beam_size=2)[::2] == ["", ""]


def test_int8_export_translates_every_line(trained, tmp_path):
    run_dir, lines = trained
    out = export_ctranslate2(run_dir, tmp_path / "int8", quantization="int8")
    assert len(ct2_translate(out, lines, beam_size=2, max_tokens=40)) == len(lines)


def test_refuses_a_non_empty_directory_unless_forced(trained, tmp_path):
    out = tmp_path / "model"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(UserError, match=str(out)):
        export_ctranslate2(trained[0], out)
    export_ctranslate2(trained[0], out, force=True)
    export_ctranslate2(trained[0], out, force=True)  # over a previous export
    assert (out / "model.bin").is_file() and (out / "notes.txt").read_text() == "keep me"


def test_missing_ctranslate2_names_the_install_command(trained, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ctranslate2", None)  # import now raises ImportError
    with pytest.raises(UserError, match=r'pip install "mtkit\[ct2\]"'):
        export_ctranslate2(trained[0], tmp_path / "model")


def test_swish_and_an_output_bias_export(tmp_path):
    """The options of imported models: CTranslate2 has swish and gelu, and an output bias."""
    from conftest import random_lines, untrained_checkpoint

    ckpt = untrained_checkpoint(tmp_path, activation="swish", output_bias=True)
    state = load_checkpoint(ckpt)
    torch.save(state, tmp_path / "no_bias.pt")  # untrained, the bias is zero
    state["model"]["output.bias"].normal_(0, 2.0)
    torch.save(state, ckpt)
    out = export_ctranslate2(ckpt, tmp_path / "ct2")
    lines = random_lines(12, seed=4)
    ours = Translator.load(ckpt, "cpu", beam_size=1).translate(lines)
    assert ct2_translate(out, lines, beam_size=1) == ours
    assert ours != Translator.load(tmp_path / "no_bias.pt", "cpu", beam_size=1).translate(lines)  # it counts


def test_long_lines_are_translated_in_pieces_as_mtkit_does(trained, exported):
    """The shared line pipeline: a line longer than the model reads is cut at punctuation and its
    pieces translated apart, by CTranslate2 as by mtkit (not truncated)."""
    run_dir, lines = trained
    long = ", ".join(lines[:12])  # far beyond max_positions 64
    ours = Translator.load(run_dir, "cpu", beam_size=1).translate([long, lines[0]])
    theirs = ct2_translate(exported, [long, lines[0]], beam_size=1)
    assert theirs == ours and len(ours[0].split()) > 25
