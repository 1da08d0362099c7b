"""tokenizer.sampling_alpha: the training pairs segmented anew at random for each epoch, before its
batches are formed (BPE-dropout / unigram sampling through SentencePiece), reproducibly, on the same
sentences."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import synthetic_pairs, write_text_pair
from mtkit.config import config_from_dict
from mtkit.data.batching import Resegmenter, token_batches
from mtkit.data.shards import PreparedData
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


def draw(data: PreparedData, alpha: float = 0.3, seed: int = 1, epoch: int = 0, longest: int = 63):
    src, tgt = data.split("train")
    return (src, tgt), Resegmenter(data.vocab, src, tgt, alpha, longest).draw(seed, epoch)


def texts(vocab, side) -> list[str]:
    return [vocab.decode([int(x) for x in side[i]]) for i in range(len(side))]


@pytest.mark.parametrize("kind, alpha", [("bpe", 0.3), ("unigram", 0.1)])
def test_resegmented_pairs_are_the_same_sentences_in_other_pieces(work, kind, alpha):
    data = PreparedData(work / f"prepared_{kind}")
    prepared, drawn = draw(data, alpha)
    for plain, new, vocab in zip(prepared, drawn, (data.vocab.src, data.vocab.tgt)):
        assert len(new) == len(plain) == 400
        assert texts(vocab, new) == texts(vocab, plain)
        assert new.lengths.tolist() == [len(new[i]) for i in range(len(new))]
        changed = [i for i in range(len(new)) if new[i].tolist() != plain[i].tolist()]
        assert len(changed) >= len(new) // 4  # many sentences of a few words get other pieces
    # the epoch's batches are formed on the drawn lengths: less padding than the prepared batches
    # would have with the drawn pieces in them
    def padding(batches, src, tgt) -> float:
        real = sum(int(src.lengths[b].sum() + tgt.lengths[b].sum()) for b in batches)
        return 1 - real / sum(len(b) * int(src.lengths[b].max() + tgt.lengths[b].max()) for b in batches)
    on_drawn = token_batches(drawn[0].lengths, drawn[1].lengths, 300)
    on_prepared = token_batches(prepared[0].lengths, prepared[1].lengths, 300)
    assert padding(on_drawn, *drawn) < padding(on_prepared, *drawn) - 0.05


def test_the_draw_depends_on_seed_and_epoch_only(work):
    data = PreparedData(work / "prepared_bpe")

    def pieces(**kw) -> list[list[int]]:
        _, (src, tgt) = draw(data, **kw)
        return [src[i].tolist() for i in range(len(src))] + [tgt[i].tolist() for i in range(len(tgt))]

    first = pieces()
    draw(data, epoch=3)  # another draw in between (the generator is global) changes nothing
    assert pieces() == first
    assert pieces(epoch=1) != first  # the next epoch: other pieces
    assert pieces(seed=2) != first  # another seed: other pieces


def test_a_kept_resegmenter_decodes_once_and_draws_each_epoch_as_a_fresh_one(work, monkeypatch):
    data = PreparedData(work / "prepared_unigram")
    src, tgt = data.split("train")
    kept = Resegmenter(data.vocab, src, tgt, 0.1, longest=63)
    calls = []
    for side in {id(v): v for v in (data.vocab.src, data.vocab.tgt)}.values():  # one object when joint
        monkeypatch.setattr(side, "decode_many", lambda ids, _d=side.decode_many: calls.append(1) or _d(ids))
    for epoch in (0, 1, 2):
        ours = kept.draw(seed=4, epoch=epoch)
        fresh = Resegmenter(data.vocab, src, tgt, 0.1, longest=63).draw(seed=4, epoch=epoch)
        for a, b in zip(ours, fresh):
            assert [a[i].tolist() for i in range(len(a))] == [b[i].tolist() for i in range(len(b))]
    # the kept one decoded each side once (one chunk each); each fresh one decoded both sides again
    assert len(calls) == 2 + 3 * 2


def test_a_sentence_whose_draw_is_too_long_keeps_its_prepared_pieces(work):
    data = PreparedData(work / "prepared_bpe")
    src = data.split("train")[0]
    longest = int(src.lengths.max())
    (src, _), (drawn, _) = draw(data, 0.9, longest=longest)
    assert int(drawn.lengths.max()) <= longest
    # at alpha 0.9 nearly every merge is dropped: the longest sentences fell back to their prepared pieces
    kept = [i for i in range(len(src)) if len(src[i]) == longest]
    assert kept and all(drawn[i].tolist() == src[i].tolist() for i in kept)


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
    # padding is counted on the drawn batches, which are longer than the prepared ones
    records = [json.loads(line) for line in (work / "run_a" / "log.jsonl").read_text().splitlines()]
    assert all(0 <= r["padding"] < 1 for r in records if "padding" in r)


def test_a_resumed_run_with_sampling_draws_what_the_uninterrupted_run_drew(work):
    steps = {"max_steps": 16, "valid_every": 5, "log_every": 1, "max_tokens": 2000}  # over 2 epochs
    full = raw_config(work, run_dir=str(work / "full"), **steps)
    full["tokenizer"]["sampling_alpha"] = 0.2
    train(config_from_dict(full))
    part = {**full, "train": {**full["train"], "run_dir": str(work / "part"), "max_steps": 8}}
    train(config_from_dict(part))  # stops mid-epoch, between validations, with a checkpoint
    part["train"]["max_steps"] = 16
    train(config_from_dict(part), resume=True)
    records = [json.loads(line) for line in (work / "full" / "log.jsonl").read_text().splitlines()]
    assert max(r["epoch"] for r in records if "epoch" in r) >= 2
    assert losses(work / "part") == losses(work / "full")


@pytest.mark.parametrize("alpha", [0, 1, 1.5, -0.1, float("nan")])
def test_sampling_alpha_outside_0_1_is_one_config_error(work, alpha):
    raw = raw_config(work)
    raw["tokenizer"]["sampling_alpha"] = alpha
    with pytest.raises(UserError, match=r"tokenizer\.sampling_alpha"):
        config_from_dict(raw)
