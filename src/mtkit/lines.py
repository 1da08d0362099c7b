"""Lines of text as the model's sources and back: a line longer than the model reads is cut at
punctuation (else at the limit), its pieces translated apart and joined again."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from mtkit.data.corpus import normalize
from mtkit.data.vocab import Vocab

CUT_POINTS = re.compile(r"(?<=[.!?;:,。！？；])\s+")
"""Where an overlong line may be cut: after sentence-internal punctuation followed by a space."""


@dataclass
class Translation:
    """One input line's result: n-best (text, score) pairs, and its subwords for attention output."""

    nbest: list[tuple[str, float]]
    src_ids: list[int]
    tgt_ids: list[int]


def pieces(vocab: Vocab, text: str, ids: list[int], limit: int,
           prefix: Sequence[int] = ()) -> list[list[int]]:
    """A line (`text`, encoded as `ids`) as the sources the model reads, each `prefix` (a tag's
    id, or nothing) followed by the line whole, or cut at punctuation, else at the limit: no
    source is longer than `limit` subwords, its prefix included."""
    prefix = list(prefix)
    if len(prefix) + len(ids) <= limit:
        return [prefix + list(ids)]
    limit = max(limit - len(prefix), 1)
    parts: list[list[int]] = []
    for segment in vocab.encode_src(CUT_POINTS.split(text)):
        if parts and len(parts[-1]) + len(segment) <= limit:
            parts[-1] = parts[-1] + segment  # join short segments back up to the limit
        else:
            parts.extend(segment[i : i + limit] for i in range(0, len(segment), limit))
    return [prefix + part for part in parts]


def join(vocab: Vocab, n_lines: int, sources: list[list[int]], owner: list[int],
         found: list) -> list[Translation]:
    """Per line: its n-best list (`found` per source), or the best of each piece joined with
    spaces; a line without sources (empty) gets an empty translation."""
    out = [Translation([("", 0.0)], [], []) for _ in range(n_lines)]
    parts: dict[int, list[int]] = {}
    for j, i in enumerate(owner):
        parts.setdefault(i, []).append(j)
    # What each line shows, decoded in one batch call (SentencePiece starts a thread pool per call)
    shown = {i: found[js[0]] if len(js) == 1 else [found[j][0] for j in js] for i, js in parts.items()}
    # byte pieces can spell a line break: whitespace runs become one space, so one line stays one line
    texts = iter(normalize(t) for t in vocab.decode_tgt([h.tokens for hyps in shown.values() for h in hyps]))
    for i, js in parts.items():
        hyps, src_ids = shown[i], [t for j in js for t in sources[j]]
        decoded = [next(texts) for _ in hyps]
        if len(js) == 1:
            out[i] = Translation(list(zip(decoded, [h.score for h in hyps])), src_ids, hyps[0].tokens)
        else:
            out[i] = Translation([(" ".join(decoded), sum(h.score for h in hyps))], src_ids,
                                 [t for h in hyps for t in h.tokens])
    return out
