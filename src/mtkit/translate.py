"""Lines in -> subwords -> length-sorted batches -> search -> lines out, in input order.

`Translator` is also the Python API: load a model once, translate lists of strings.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import torch

from mtkit.checkpoint import load_checkpoint, resolve_model
from mtkit.config import DecodeConfig, config_from_dict
from mtkit.data.batching import pad, token_batches
from mtkit.data.corpus import normalize
from mtkit.data.vocab import Vocab
from mtkit.errors import UserError
from mtkit.model import EOS, Transformer
from mtkit.search import Hypothesis, beam_search, greedy_search

log = logging.getLogger("mtkit")


def pick_device(name: str = "auto") -> torch.device:
    """auto: CUDA when available, else CPU; cuda or cuda:N only when CUDA is there."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"device {name!r}: expected auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {name!r}: no CUDA device is available here")
    return device


class Translator:
    """A loaded model with its vocabulary and decoding settings."""

    def __init__(self, model: Transformer, vocab: Vocab, decode: DecodeConfig, device: torch.device):
        self.model, self.vocab, self.decode, self.device = model.eval(), vocab, decode, device

    @classmethod
    def load(cls, path: str | Path, device: str = "auto", **overrides) -> "Translator":
        """From a checkpoint file or run directory; `overrides` replace DecodeConfig fields."""
        ckpt = resolve_model(path)
        state = load_checkpoint(ckpt)
        cfg = config_from_dict(state["config"], str(ckpt))
        vocab = Vocab.from_state(state["vocab"])
        model = Transformer(cfg.model, vocab.src_size, vocab.tgt_size)
        model.load_state_dict(state["model"])
        dev = pick_device(device)
        decode = replace(cfg.decode, **{k: v for k, v in overrides.items() if v is not None})
        log.info("loaded %s (step %s) on %s", ckpt, state.get("step"), dev)
        return cls(model.to(dev), vocab, decode, dev)

    def _chunks(self, ids: list[int]) -> list[list[int]]:
        """Split a source longer than the model's positions into pieces it can read."""
        limit = self.model.cfg.max_positions - 1 - self.decode.max_len_offset  # room for EOS and output
        limit = max(limit, 1)
        return [ids[i : i + limit] for i in range(0, len(ids), limit)] or [[]]

    def _search(self, src: torch.Tensor, nbest: int) -> list[list[Hypothesis]]:
        d = self.decode
        autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device.type == "cuda")
        with autocast:
            if d.beam_size == 1 and nbest == 1:
                return [[Hypothesis(t, 0.0)] for t in greedy_search(self.model, src, d.max_len_offset)]
            return beam_search(self.model, src, d.beam_size, d.length_penalty, d.max_len_offset, nbest)

    def translate_nbest(self, lines: list[str], nbest: int = 1) -> list[list[tuple[str, float]]]:
        """Up to `nbest` (translation, score) pairs per input line, in input order."""
        if nbest > self.decode.beam_size:
            raise ValueError(f"nbest ({nbest}) cannot exceed the beam size ({self.decode.beam_size})")
        texts = [normalize(line) for line in lines]
        pieces: list[list[int]] = []  # every chunk of every line
        owner: list[int] = []
        for i, ids in enumerate(self.vocab.encode_src(texts)):
            if not texts[i]:
                continue  # an empty line translates to an empty line
            chunks = self._chunks(ids)
            if len(chunks) > 1:
                log.warning("line %d: %d subwords exceed the model's limit; translating %d chunks",
                            i + 1, len(ids), len(chunks))
            pieces.extend(chunks)
            owner.extend([i] * len(chunks))
        results: list[list[Hypothesis]] = [[] for _ in pieces]
        lengths = [len(p) for p in pieces]
        budget = max(1, self.decode.max_tokens // self.decode.beam_size)
        for batch in token_batches(lengths, lengths, budget):
            src = pad([pieces[j] for j in batch], suffix=EOS).to(self.device)
            for j, hyps in zip(batch, self._search(src, nbest)):
                results[j] = hyps
        out: list[list[tuple[str, float]]] = [[("", 0.0)] for _ in lines]
        joined: dict[int, list[list[Hypothesis]]] = {}
        for j, i in enumerate(owner):
            joined.setdefault(i, []).append(results[j])
        for i, parts in joined.items():
            if len(parts) == 1:
                hyps = parts[0]
                out[i] = list(zip(self.vocab.decode_tgt([h.tokens for h in hyps]), [h.score for h in hyps]))
            else:  # chunks: join the best translation of each
                text = " ".join(self.vocab.decode_tgt([p[0].tokens for p in parts]))
                out[i] = [(text, sum(p[0].score for p in parts))]
        return out

    def translate(self, lines: list[str]) -> list[str]:
        """One translation per input line, in input order; empty lines stay empty."""
        return [hyps[0][0] for hyps in self.translate_nbest(lines, 1)]
