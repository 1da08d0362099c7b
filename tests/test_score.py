"""`mtkit score`: the model's log-probability of a reference given its source, as the training
loss computes it, per line in input order, and its one-line errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from conftest import WORDS, random_lines, tagged_vocab, tiny_model_config, untrained_checkpoint
from mtkit.cli import app
from mtkit.data.batching import collate
from mtkit.engine import label_smoothed_loss
from mtkit.errors import UserError
from mtkit.model import Transformer
from mtkit.translate import load_model, score_pairs

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return untrained_checkpoint(tmp_path_factory.mktemp("score"))


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(f"{line}\n" for line in lines), encoding="utf-8")
    return path


def training_nll(model: Transformer, src_ids: list[int], tgt_ids: list[int]) -> float:
    """The training path's summed negative log-likelihood of one pair (label smoothing 0)."""
    batch = collate([src_ids], [tgt_ids])
    with torch.no_grad():
        logits = model(batch["src"], batch["tgt_in"])
    return float(label_smoothed_loss(logits, batch["tgt_out"], 0.0)[1])


def score_cli(*args: str):
    return CliRunner().invoke(app, ["-q", "score", *args])


def test_scores_are_minus_the_training_nll_per_line_in_input_order(checkpoint, tmp_path):
    sources, references = random_lines(40, seed=1, longest=12), random_lines(40, seed=2, longest=12)
    sources[3], references[5], sources[7], references[7] = "", "", "", ""  # empty lines are scored too
    src, ref = write_lines(tmp_path / "src.txt", sources), write_lines(tmp_path / "ref.txt", references)
    model, vocab, _, _ = load_model(checkpoint)
    model.eval()
    src_ids, tgt_ids = vocab.encode_src(sources), vocab.encode_tgt(references)
    expected = [-training_nll(model, s, t) for s, t in zip(src_ids, tgt_ids)]
    assert len(set(expected)) == len(expected)  # every line its own number: the order is visible

    proc = score_cli("-m", str(checkpoint), "--src", str(src), "--ref", str(ref), "--max-tokens", "60")
    assert proc.exit_code == 0, proc.stderr
    got = [float(x) for x in proc.stdout.split("\n")[:-1]]
    assert got == pytest.approx(expected, rel=1e-6, abs=2e-5)  # 6 decimals, fp32 sums
    assert all(len(x.split(".")[1]) == 6 for x in proc.stdout.split())

    per_token = score_cli("-m", str(checkpoint), "--src", str(src), "--ref", str(ref), "--per-token",
                          "--output", str(tmp_path / "scores.txt"))
    assert per_token.exit_code == 0 and per_token.stdout == "", per_token.stderr
    got = [float(x) for x in (tmp_path / "scores.txt").read_text().split("\n")[:-1]]
    assert got == pytest.approx([e / (len(t) + 1) for e, t in zip(expected, tgt_ids)], rel=1e-6, abs=2e-5)
    assert got[5] == pytest.approx(expected[5])  # an empty reference: EOS alone


def test_line_counts_must_match_and_a_pair_too_long_is_named(checkpoint, tmp_path):
    src = write_lines(tmp_path / "src.txt", ["the dog", "a cat"])
    ref = write_lines(tmp_path / "ref.txt", ["THE DOG"])
    proc = score_cli("-m", str(checkpoint), "--src", str(src), "--ref", str(ref))
    errors = proc.stderr.strip().splitlines()
    assert proc.exit_code == 2 and len(errors) == 1 and proc.stdout == ""
    assert f"{src} has 2 lines but {ref} has 1" in errors[0]

    long_ref = write_lines(tmp_path / "long.txt", ["THE DOG", " ".join(WORDS * 8)])  # 64 positions at most
    proc = score_cli("-m", str(checkpoint), "--src", str(src), "--ref", str(long_ref))
    errors = proc.stderr.strip().splitlines()
    assert proc.exit_code == 2 and len(errors) == 1 and f"{long_ref}:2:" in errors[0], proc.stderr


def test_the_prefix_tag_goes_in_front_of_every_scored_source():
    vocab = tagged_vocab()
    model = Transformer(tiny_model_config(), vocab.src_size, vocab.tgt_size).eval()
    sources, references = ["the dog runs", ""], ["a red house", "the cat"]
    tag = vocab.tag_id("<BT>")
    got = score_pairs(model, vocab, sources, references, torch.device("cpu"), prefix="<BT>")
    expected = [-training_nll(model, [tag] + s, t)
                for s, t in zip(vocab.encode_src(sources), vocab.encode_tgt(references))]
    assert got == pytest.approx(expected, abs=1e-5)
    untagged = score_pairs(model, vocab, sources, references, torch.device("cpu"))
    assert untagged != pytest.approx(got, abs=1e-5)
    with pytest.raises(UserError, match="--prefix.*'<XX>'"):
        score_pairs(model, vocab, sources, references, torch.device("cpu"), prefix="<XX>")
