"""Token-budget batches of similar-length sentences, grouped into optimizer steps and shared out
across ranks, padding them into tensors, and segmenting them anew at random (subword
regularisation)."""

from __future__ import annotations

import zlib
from collections.abc import Iterator
from itertools import islice

import numpy as np
import sentencepiece as spm
import torch

from mtkit.data.vocab import BOS, EOS, PAD, Vocab


def token_batches(src_lens: np.ndarray, tgt_lens: np.ndarray, max_tokens: int,
                  rng: np.random.Generator | None = None) -> list[np.ndarray]:
    """Group sentence indices into batches whose padded size (longest x count) fits `max_tokens`.

    Sentences are sorted by length (random tie-break when `rng` is given) so a batch holds similar
    lengths and little padding; with `rng` the batch order is shuffled too. Lengths count the
    EOS/BOS token each side gets. A sentence longer than the budget gets a batch of its own.
    """
    src_lens, tgt_lens = np.asarray(src_lens) + 1, np.asarray(tgt_lens) + 1
    noise = rng.random(len(src_lens)) if rng is not None else np.arange(len(src_lens))
    order = np.lexsort((noise, src_lens, tgt_lens))
    longest = np.maximum(src_lens, tgt_lens)[order]
    batches, start, width = [], 0, 0
    for i, length in enumerate(longest):
        width = max(width, int(length))
        if (i + 1 - start) * width > max_tokens and i > start:
            batches.append(order[start:i])
            start, width = i, int(length)
    if start < len(order):
        batches.append(order[start:])
    if rng is not None:
        batches = [batches[i] for i in rng.permutation(len(batches))]
    return batches


POOL_BLOCK = 1024
"""Consecutive pairs that go into a pool together: pools are drawn from random parts of the corpus."""


def pooled_batches(src_lens: np.ndarray, tgt_lens: np.ndarray, max_tokens: int, rng: np.random.Generator,
                   pool_size: int | None) -> Iterator[np.ndarray]:
    """`token_batches` of one epoch, sorted within pools of `pool_size` pairs rather than the whole
    corpus (Marian's maxi-batches), so memory is bounded by the pool, not the corpus.

    A pool is a random set of blocks of POOL_BLOCK consecutive pairs; batches are shuffled within
    their pool. A corpus no larger than one pool gives exactly `token_batches(..., rng)`.
    """
    n = len(src_lens)
    if pool_size is None or n <= pool_size:
        yield from token_batches(np.asarray(src_lens), np.asarray(tgt_lens), max_tokens, rng)
        return
    blocks = rng.permutation(-(-n // POOL_BLOCK))
    per_pool = max(1, pool_size // POOL_BLOCK)
    for first in range(0, len(blocks), per_pool):
        ranges = [(b * POOL_BLOCK, min(n, (b + 1) * POOL_BLOCK)) for b in blocks[first : first + per_pool]]
        index = np.concatenate([np.arange(lo, hi) for lo, hi in ranges])
        src = np.concatenate([src_lens[lo:hi] for lo, hi in ranges])
        tgt = np.concatenate([tgt_lens[lo:hi] for lo, hi in ranges])
        for batch in token_batches(src, tgt, max_tokens, rng):
            yield index[batch]


def step_groups(src_lens: np.ndarray, tgt_lens: np.ndarray, max_tokens: int, seed: int, epoch: int,
                group: int, pool_size: int | None, skip: int = 0) -> Iterator[list[np.ndarray]]:
    """The batches of one epoch in groups of accum_steps x world (one optimizer step each), from
    group `skip` on.

    A function of (seed, epoch) alone, so resume rebuilds them and every rank agrees; a last
    group that would leave a rank without a batch is dropped (the epoch's shuffle varies it).
    Built lazily, one pool at a time.
    """
    batches = pooled_batches(src_lens, tgt_lens, max_tokens, np.random.default_rng([seed, epoch]), pool_size)
    groups = iter(lambda: list(islice(batches, group)), [])
    for g in islice(groups, skip, None):
        if len(g) < group:
            return
        yield g


def rank_batches(groups: Iterator[list[np.ndarray]], rank: int, world: int) -> Iterator[np.ndarray]:
    """This rank's batches of each group: the sentences a rank loads (it reads no other rank's)."""
    for g in groups:
        yield from g[rank::world]


def pad(seqs: list, prefix: int | None = None, suffix: int | None = None) -> torch.Tensor:
    """Right-pad id sequences into a (B, L) int64 tensor, adding an optional first/last token."""
    extra = (prefix is not None) + (suffix is not None)
    out = torch.full((len(seqs), max(len(s) for s in seqs) + extra), PAD, dtype=torch.long)
    for i, s in enumerate(seqs):
        row = ([prefix] if prefix is not None else []) + list(s) + ([suffix] if suffix is not None else [])
        out[i, : len(row)] = torch.as_tensor(row, dtype=torch.long)
    return out


def collate(src: list, tgt: list) -> dict[str, torch.Tensor]:
    """Source + EOS; target input BOS + target; target output target + EOS (teacher forcing)."""
    return {"src": pad(src, suffix=EOS), "tgt_in": pad(tgt, prefix=BOS), "tgt_out": pad(tgt, suffix=EOS)}


DRAW_CHUNK = 4096
"""Pairs segmented in one SentencePiece call under one seed: a pair's draw depends on the seed, the
epoch, its side and the chunk of DRAW_CHUNK pairs it is in."""


class Drawn:
    """One side of the training pairs as segmented for one epoch: `lengths`, `len` and `[i]` as
    the prepared token arrays have them."""

    def __init__(self, seqs: list[np.ndarray]):
        self.seqs = seqs
        self.lengths = np.fromiter(map(len, seqs), dtype=np.int64, count=len(seqs))

    def __len__(self) -> int:
        return len(self.seqs)

    def __getitem__(self, i: int) -> np.ndarray:
        return self.seqs[int(i)]


def _chunk(ids, lo: int) -> list[np.ndarray]:
    return [ids[i] for i in range(lo, min(len(ids), lo + DRAW_CHUNK))]


class Resegmenter:
    """Both sides of the training pairs segmented anew at random for each epoch (SentencePiece
    sampling with `alpha`; Kudo 2018, Provilkov et al. 2020), before the epoch's batches are formed,
    so batches are made of similar drawn lengths and keep their token budget and little padding.

    The draw depends only on the seed and the epoch, so a resumed run, and every rank, segments the
    epoch as the uninterrupted run does. A sentence whose new segmentation would be empty or longer
    than `longest` keeps the prepared one. The sentences' text is decoded from the prepared ids
    once, at the first draw, and kept for the later epochs."""

    def __init__(self, vocab: Vocab, src, tgt, alpha: float, longest: int):
        self.pieces = ((vocab.src, src), (vocab.tgt, tgt))
        self.alpha, self.longest = alpha, longest
        self.texts: list[list[list[str]]] | None = None  # side -> chunk -> sentences

    def _decoded(self) -> list[list[list[str]]]:
        if self.texts is None:
            self.texts = [[side.decode_many([w.tolist() for w in _chunk(ids, lo)])
                           for lo in range(0, len(ids), DRAW_CHUNK)] for side, ids in self.pieces]
        return self.texts

    def draw(self, seed: int, epoch: int) -> tuple[Drawn, Drawn]:
        """The pairs as segmented for this epoch of a run with this seed."""
        sides = []
        for k, ((side, ids), chunks) in enumerate(zip(self.pieces, self._decoded()), 1):
            seqs: list[np.ndarray] = []
            for c, text in enumerate(chunks):
                lo = c * DRAW_CHUNK
                key = np.array([seed, epoch, k, lo], dtype=np.int64).tobytes()
                spm.set_random_generator_seed(zlib.crc32(key))
                drawn = side.encode_sampled(text, self.alpha)
                seqs += [np.asarray(d, dtype=ids[lo + j].dtype) if 0 < len(d) <= self.longest else ids[lo + j]
                         for j, d in enumerate(drawn)]
            sides.append(Drawn(seqs))
        return sides[0], sides[1]

