"""Sampling (`translate --sample`): the drawn distribution under temperature, top-k and top-p, the
score of a sample, reproducibility under a seed whatever the batching, and the source prefix tag."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from conftest import random_lines, tagged_vocab, tiny_model_config, untrained_checkpoint
from mtkit.cli import app
from mtkit.config import DecodeConfig
from mtkit.data.batching import collate
from mtkit.data.vocab import BOS, EOS, PAD, UNK
from mtkit.engine import label_smoothed_loss
from mtkit.lines import pieces
from mtkit.model import Transformer
from mtkit.search import sample_search, sample_tokens
from mtkit.translate import Translator, load_model

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return untrained_checkpoint(tmp_path_factory.mktemp("sampling"))


def frequencies(logits: list[float], **options) -> list[float]:
    """How often each token is drawn over an even grid of 10,000 uniforms: its probability, to 1e-4."""
    n = 10_000
    u = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    drawn = sample_tokens(torch.tensor([logits]).expand(n, -1).clone(), u, **options)
    return (torch.bincount(drawn, minlength=len(logits)).double() / n).tolist()


def test_draws_follow_the_tempered_distribution():
    logits = [0.0, math.log(3.0), -float("inf"), math.log(6.0)]  # probabilities 0.1, 0.3, 0, 0.6
    assert frequencies(logits, top_k=0, top_p=1.0, temperature=1.0) == pytest.approx([0.1, 0.3, 0, 0.6],
                                                                                      abs=2e-4)
    sq = [1.0, math.sqrt(3.0), 0.0, math.sqrt(6.0)]  # temperature 2: probabilities as the square roots
    expected = [s / sum(sq) for s in sq]
    assert frequencies(logits, top_k=0, top_p=1.0, temperature=2.0) == pytest.approx(expected, abs=2e-4)
    cold = frequencies(logits, top_k=0, top_p=1.0, temperature=0.01)
    assert cold == pytest.approx([0, 0, 0, 1], abs=2e-4)


def test_top_k_then_top_p_keep_the_most_probable_tokens_renormalised():
    logits = [math.log(p) for p in (0.1, 0.2, 0.3, 0.4)]
    assert frequencies(logits, top_k=2, top_p=1.0, temperature=1.0) == pytest.approx([0, 0, 3 / 7, 4 / 7],
                                                                                     abs=2e-4)
    # top-p 0.6: 0.4 alone is short of it, 0.4 + 0.3 reaches it; 0.2 and 0.1 are left out
    assert frequencies(logits, top_k=0, top_p=0.6, temperature=1.0) == pytest.approx([0, 0, 3 / 7, 4 / 7],
                                                                                     abs=2e-4)
    # top-p after top-k: of the three best (0.2, 0.3, 0.4)/0.9, 0.4/0.9 < 0.5 <= 0.7/0.9
    assert frequencies(logits, top_k=3, top_p=0.5, temperature=1.0) == pytest.approx([0, 0, 3 / 7, 4 / 7],
                                                                                     abs=2e-4)
    assert frequencies(logits, top_k=0, top_p=1e-6, temperature=1.0) == pytest.approx([0, 0, 0, 1])


def test_a_sample_is_reproducible_and_does_not_depend_on_batches_window_or_workers(checkpoint):
    lines = random_lines(30)
    first = Translator.load(checkpoint, "cpu", sample=True, seed=3).translate(lines)
    assert all(out == "" for out, line in zip(first, lines) if not line)  # empty lines stay empty
    assert Translator.load(checkpoint, "cpu", sample=True, seed=3).translate(lines) == first
    small = Translator.load(checkpoint, "cpu", sample=True, seed=3, max_tokens=30)
    assert small.translate(lines) == first
    assert [t.nbest[0][0] for t in small.stream(lines, window=7)] == first
    with Translator.load(checkpoint, "cpu", workers=2, sample=True, seed=3, max_tokens=40) as two:
        assert two.translate(lines) == first
        assert two._pool.started  # the batches did go to the worker processes
    other = Translator.load(checkpoint, "cpu", sample=True, seed=4).translate(lines)
    non_empty = [i for i, line in enumerate(lines) if line]
    assert sum(other[i] != first[i] for i in non_empty) > len(non_empty) // 2


def test_sampling_with_top_k_1_tiny_top_p_or_temperature_is_greedy_search(checkpoint):
    lines = random_lines(20, seed=1)
    greedy = Translator.load(checkpoint, "cpu", beam_size=1).translate(lines)
    assert Translator.load(checkpoint, "cpu", sample=True, top_k=1).translate(lines) == greedy
    assert Translator.load(checkpoint, "cpu", sample=True, top_p=1e-6).translate(lines) == greedy
    assert Translator.load(checkpoint, "cpu", sample=True, temperature=1e-4).translate(lines) == greedy
    assert Translator.load(checkpoint, "cpu", sample=True, seed=9).translate(lines) != greedy


def test_the_score_of_a_sample_is_the_models_log_probability_and_never_pad_or_bos(checkpoint, monkeypatch):
    model, vocab, _, _ = load_model(checkpoint)
    model.eval()
    src_ids = vocab.encode_src(random_lines(12, seed=2))
    batch = collate(src_ids, [[]] * len(src_ids))
    hyps = sample_search(model, batch["src"], [[7, i] for i in range(len(src_ids))], 6, top_k=50,
                         temperature=2.0)
    for ids, hyp in zip(src_ids, hyps):
        one = collate([ids], [hyp.tokens])
        with torch.no_grad():
            logits = model(one["src"], one["tgt_in"])
        nll = label_smoothed_loss(logits, one["tgt_out"], 0.0)[1]
        assert hyp.score == pytest.approx(-float(nll), abs=1e-4)  # untempered, unfiltered, EOS included
    decode = model.decode  # a model that puts nearly all its mass on PAD and BOS

    def fond_of_pad_and_bos(*args, **kwargs):
        logits = decode(*args, **kwargs).clone()
        logits[..., [PAD, BOS]] += 100.0
        return logits

    monkeypatch.setattr(model, "decode", fond_of_pad_and_bos)
    hyps = sample_search(model, batch["src"], [[1, i] for i in range(len(src_ids))], 6, temperature=5.0)
    drawn = [t for h in hyps for t in h.tokens]
    assert drawn and not {PAD, BOS} & set(drawn)


def translate_cli(checkpoint: Path, *args: str, lines: list[str]):
    return CliRunner().invoke(app, ["-q", "translate", "-m", str(checkpoint), *args],
                              input="".join(f"{line}\n" for line in lines))


def test_cli_sampling_options_reach_the_translator_and_misuse_is_one_line(checkpoint):
    lines = random_lines(15, seed=3)
    options = ["--sample", "--seed", "5", "--top-k", "20"]
    a = translate_cli(checkpoint, *options, "--window", "4", lines=lines)
    b = translate_cli(checkpoint, *options, "--max-tokens", "25", lines=lines)
    assert a.exit_code == 0 and b.exit_code == 0, a.stderr + b.stderr
    expected = Translator.load(checkpoint, "cpu", sample=True, seed=5, top_k=20).translate(lines)
    assert a.stdout.split("\n")[:-1] == b.stdout.split("\n")[:-1] == expected  # outputs hold \x0c, \x1c...
    for args, words in [(["--sample", "--nbest", "2"], "--nbest 2"), (["--sample", "--beam", "3"], "--beam"),
                        (["--top-p", "0.9"], "--sample"), (["--sample", "--top-p", "0"], "--top-p 0"),
                        (["--sample", "--temperature", "0"], "--temperature 0")]:
        proc = translate_cli(checkpoint, *args, lines=lines)
        errors = proc.stderr.strip().splitlines()
        assert proc.exit_code == 2 and len(errors) == 1 and words in errors[0], (args, proc.stderr)
        assert proc.stdout == ""


def test_prefix_puts_the_tag_first_and_leaves_room_for_it():
    vocab = tagged_vocab()
    tag = vocab.tag_id("<BT>")
    assert tag not in (PAD, UNK, BOS, EOS)
    line = "the small dog runs in the red house"
    ids = vocab.encode_src([line])[0]
    model = Transformer(tiny_model_config(max_positions=32), vocab.src_size, vocab.tgt_size)
    offset = 31 - len(ids)  # the source limit is then exactly this line's length
    translator = Translator(model, vocab, DecodeConfig(beam_size=1, max_len_offset=offset, prefix="<BT>"),
                            torch.device("cpu"))
    plain = Translator(model, vocab, DecodeConfig(beam_size=1, max_len_offset=offset), torch.device("cpu"))
    assert translator.source_limit == plain.source_limit == len(ids)
    short = "the dog runs"
    result, empty = translator.run([short, "  "])
    assert result.src_ids == [tag] + vocab.encode_src([short])[0]
    assert empty.nbest == [("", 0.0)] and empty.src_ids == []  # an empty line: no translation of the tag
    # the line fits alone, but not with the tag: it is cut, each piece tagged and within the limit
    (whole,) = plain.run([line])
    assert whole.src_ids == ids
    parts = pieces(vocab, line, ids, len(ids), [tag])
    assert len(parts) == 2 and all(p[0] == tag and len(p) <= len(ids) for p in parts)
    assert [t for p in parts for t in p[1:]] == ids
    (cut,) = translator.run([line])
    assert cut.src_ids == [t for p in parts for t in p]


def test_an_unknown_prefix_tag_is_one_line_naming_it(checkpoint):
    proc = translate_cli(checkpoint, "--prefix", "<XX>", lines=["the dog"])
    errors = proc.stderr.strip().splitlines()
    assert proc.exit_code == 2 and len(errors) == 1 and proc.stdout == ""
    assert "--prefix" in errors[0] and "'<XX>'" in errors[0]


def test_a_drawn_byte_piece_that_spells_a_line_break_stays_inside_its_line():
    from mtkit.lines import join
    from mtkit.search import Hypothesis

    class Bytes:  # decodes to text with the line breaks byte pieces can spell
        def decode_tgt(self, ids):
            return ["one\ntwo\r\nthree" for _ in ids]

    out = join(Bytes(), 1, [[5]], [0], [[Hypothesis([7], 0.0)]])
    assert out[0].nbest[0][0] == "one two three"
