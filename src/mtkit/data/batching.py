"""Token-budget batches of similar-length sentences, and padding them into tensors."""

from __future__ import annotations

import numpy as np
import torch

from mtkit.model import BOS, EOS, PAD


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
