"""scripts/hf_peer.py: an mtkit model converted to transformers computes the same function."""

from __future__ import annotations

import sys

import pytest
import torch

from conftest import ROOT, tiny_model_config, untrained_checkpoint
from mtkit.data.batching import pad
from mtkit.data.vocab import BOS, EOS, PAD
from mtkit.model import Transformer
from mtkit.search import greedy_search

pytest.importorskip("transformers")
sys.path.insert(0, str(ROOT / "scripts"))  # scripts/ is not a package; bench_translate.py imports it this way
from hf_peer import convert, generate_ids, hf_translate, to_transformers

VOCAB = 32


def random_batch(n: int, low: int, high: int, seed: int, eos: int | None = None, bos: int | None = None,
                 vocab: int = VOCAB) -> torch.Tensor:
    """n random id rows of lengths in [low, high], right-padded, without specials inside."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(low, high + 1, (n,), generator=g).tolist()
    rows = [torch.randint(4, vocab, (n_,), generator=g).tolist() for n_ in lengths]
    return pad(rows, prefix=bos, suffix=eos)


def pair(src_vocab: int = VOCAB, tgt_vocab: int = VOCAB, eos_scale: float = 1.0,
         **changes) -> tuple[Transformer, object]:
    """A tiny untrained mtkit model and its transformers twin; `eos_scale` > 1 makes EOS likelier."""
    cfg = tiny_model_config(n_layers=2, **changes)
    model = Transformer(cfg, src_vocab, tgt_vocab).eval()
    with torch.no_grad():  # untrained LayerNorms are 1 and 0: make them count
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
        model.tgt_embed.tokens.weight[EOS] *= eos_scale
    return model, convert(model.state_dict(), cfg, src_vocab, tgt_vocab)


CASES = {"pre-norm, shared (M2M100)": {"norm": "pre"},
         "post-norm, shared (Marian)": {"norm": "post"},
         "pre-norm, untied (M2M100)": {"norm": "pre", "share_embeddings": False},
         "post-norm, untied, two vocabularies (Marian)": {"norm": "post", "share_embeddings": False,
                                                          "tgt_vocab": 40}}


@pytest.mark.parametrize("case", CASES)
def test_teacher_forced_logits_match(case):
    changes = dict(CASES[case])
    tgt_vocab = changes.pop("tgt_vocab", VOCAB)
    model, hf = pair(tgt_vocab=tgt_vocab, **changes)
    assert type(hf).__name__ == ("M2M100ForConditionalGeneration" if changes["norm"] == "pre"
                                 else "MarianMTModel")
    src = random_batch(5, 1, 12, seed=1, eos=EOS)
    tgt_in = random_batch(5, 1, 9, seed=2, bos=BOS, vocab=tgt_vocab)
    with torch.no_grad():
        ours = model(src, tgt_in)  # (B, T, V)
        theirs = hf(input_ids=src, attention_mask=src != PAD, decoder_input_ids=tgt_in).logits
    real = tgt_in != PAD  # padded target positions are never read (M2M100 gives them no position)
    assert theirs.shape == ours.shape
    torch.testing.assert_close(theirs[real], ours[real], atol=1e-4, rtol=0)


@pytest.mark.parametrize(("norm", "eos_scale"), [("pre", 3.0), ("post", 1.5)])
def test_greedy_generate_equals_greedy_search(norm, eos_scale):
    model, hf = pair(norm=norm, eos_scale=eos_scale)
    src = random_batch(8, 1, 10, seed=3, eos=EOS)
    offset = 8
    ours = greedy_search(model, src, max_len_offset=offset)
    # mtkit's limit is per sentence (source + EOS + offset steps, the last EOS); generate's per batch
    steps = ((src != PAD).sum(1) + offset).tolist()
    theirs = generate_ids(hf, src, max(steps), beam_size=1)
    assert [row[: n - 1] for row, n in zip(theirs, steps)] == ours
    assert any(len(row) < n - 1 for row, n in zip(ours, steps)), "no sentence ended by EOS: a weaker test"


def test_translate_lines_as_mtkit_greedy(tmp_path):
    """Text in, text out through a checkpoint: the bench's path, with SentencePiece and batching."""
    from mtkit.translate import Translator

    path = untrained_checkpoint(tmp_path, norm="pre")
    lines = ["the red dog runs", "", "a small cat sits on the big blue house in the street", "man"]
    ours = Translator.load(path, "cpu", beam_size=1, max_tokens=24).translate(lines)
    theirs = hf_translate(to_transformers(path), lines, beam_size=1, max_tokens=24)
    assert theirs == ours
    assert theirs[1] == ""


def test_two_vocabularies_pre_norm_refused():
    with pytest.raises(ValueError, match="one vocabulary"):
        pair(tgt_vocab=40, norm="pre", share_embeddings=False)
