"""tokenizer.sampling_alpha: training pairs segmented anew at random when their batch is built
(BPE-dropout / unigram sampling through SentencePiece), reproducibly, on the same sentences."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import synthetic_pairs, write_text_pair
from mtkit.config import config_from_dict
from mtkit.data.batching import Resegment, collate
from mtkit.data.shards import PreparedData
from mtkit.data.vocab import BOS, EOS, PAD
from mtkit.errors import UserError
from mtkit.prepare import prepare
from mtkit.train import train


def raw_config(work: Path, kind: str = "bpe", **train) -> dict:
    return {
        "data": {"format": "text", "dir": str(work),
                 "splits": {"train": "train.{lang}", "valid": "valid.{lang}"},
                 "src_lang": "xx", "tgt_lang": "yy", "prepared_dir": str(work / f"prepared_{kind}")},
        "tokenizer": {"type": kind, "vocab_size": 320, "byte_fallback": True},
        "model": {"d_model": 32, "n_heads": 2, "d_ff": 64, "n_layers": 1, "dropout": 0.0,
                  "max_positions": 64},
        "train": {"max_tokens": 300, "max_steps": 6, "warmup_steps": 2, "log_every": 1, "valid_every": 6,
                  "valid_bleu_sentences": 4, "precision": "fp32", "device": "cpu", "threads": 1, "seed": 5,
                  "run_dir": str(work / "run"), **train},
        "decode": {"beam_size": 2, "max_len_offset": 5},
    }


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("sampling")
    pairs = synthetic_pairs(400)
    write_text_pair(work, "train", pairs)
    write_text_pair(work, "valid", pairs[:8])
    for kind in ("bpe", "unigram"):
        prepare(config_from_dict(raw_config(work, kind)))
    return work


def items(data: PreparedData, n: int = 40) -> list:
    src, tgt = data.split("train")
    return [(i, src[i], tgt[i]) for i in range(n)]


def texts(vocab, ids: torch.Tensor) -> list[str]:
    return [vocab.decode([int(x) for x in row if x > EOS]) for row in ids]


@pytest.mark.parametrize("kind, alpha", [("bpe", 0.3), ("unigram", 0.1)])
def test_resegmented_batches_are_the_same_sentences_in_other_pieces(work, kind, alpha):
    data = PreparedData(work / f"prepared_{kind}")
    batch = items(data)
    plain = collate([s for _, s, _ in batch], [t for _, _, t in batch])
    drawn = Resegment(data.vocab, alpha, seed=1, epoch=0, longest=63)(batch)
    for key in ("src", "tgt_out"):
        assert texts(data.vocab.src, drawn[key]) == texts(data.vocab.src, plain[key])
    def pieces(row: torch.Tensor) -> list[int]:
        return row[row != PAD].tolist()

    changed = [i for i in range(len(batch)) if pieces(drawn["src"][i]) != pieces(plain["src"][i])]
    assert len(changed) >= len(batch) // 4  # many sentences of a few words get other pieces
    # teacher forcing stays aligned: BOS + target, target + EOS
    assert (drawn["tgt_in"][:, 0] == BOS).all()
    shifted = drawn["tgt_out"][:, :-1]
    assert torch.equal(drawn["tgt_in"][:, 1:], shifted.masked_fill(shifted == EOS, PAD))


def test_the_draw_depends_on_seed_epoch_and_pairs_only(work):
    data = PreparedData(work / "prepared_bpe")
    batch = items(data)

    def draw(seed: int, epoch: int, these=batch) -> dict:
        return Resegment(data.vocab, 0.3, seed=seed, epoch=epoch, longest=63)(these)

    first = draw(1, 0)
    draw(1, 3)  # another draw in between (the generator is global) changes nothing
    assert all(torch.equal(first[k], draw(1, 0)[k]) for k in first)
    assert not torch.equal(first["src"], draw(1, 1)["src"])  # the next epoch: other pieces
    assert not torch.equal(first["src"], draw(2, 0)["src"])  # another seed: other pieces
    shifted = [(i + 1000, s, t) for i, s, t in batch]  # other pairs with the same text
    assert not torch.equal(first["src"], draw(1, 0, shifted)["src"])


def test_a_sentence_whose_draw_is_too_long_keeps_its_prepared_pieces(work):
    data = PreparedData(work / "prepared_bpe")
    batch = items(data)
    longest = max(len(s) for _, s, _ in batch)
    drawn = Resegment(data.vocab, 0.9, seed=1, epoch=0, longest=longest)(batch)
    for row in drawn["src"]:
        assert len(row[row != PAD]) - 1 <= longest  # without EOS
    # at alpha 0.9 nearly every merge is dropped: the long sentences fell back to their prepared pieces
    kept = [i for i, (_, s, _) in enumerate(batch) if len(s) == longest]
    for i in kept:
        assert drawn["src"][i][: len(batch[i][1])].tolist() == batch[i][1].tolist()


def losses(run_dir: Path) -> list[float]:
    records = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if "loss" in r]


def test_training_with_sampling_is_reproducible_and_differs_from_without(work):
    runs = {}
    for name, alpha in (("a", 0.2), ("b", 0.2), ("plain", None)):
        raw = raw_config(work, run_dir=str(work / f"run_{name}"))
        raw["tokenizer"]["sampling_alpha"] = alpha
        train(config_from_dict(raw))
        runs[name] = losses(work / f"run_{name}")
    assert len(runs["a"]) == 6 and all(np.isfinite(runs["a"]))
    assert runs["a"] == runs["b"]
    assert runs["a"] != runs["plain"]


@pytest.mark.parametrize("alpha", [0, 1, 1.5, -0.1, float("nan")])
def test_sampling_alpha_outside_0_1_is_one_config_error(work, alpha):
    raw = raw_config(work)
    raw["tokenizer"]["sampling_alpha"] = alpha
    with pytest.raises(UserError, match=r"tokenizer\.sampling_alpha"):
        config_from_dict(raw)
