"""Lines of text as the model's sources and back, the one pipeline of every translator (mtkit's
own search, CTranslate2, transformers): lines are whitespace-normalised, an empty line translates to
an empty line, a line longer than the model reads is cut at punctuation (else at the limit) and its
pieces translated apart and joined again, sources go to the search in length-sorted token-budget
batches, and translations come back in input order."""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from mtkit.data.corpus import normalize
from mtkit.data.vocab import Vocab
from mtkit.inference.workers import rebalance

log = logging.getLogger("mtkit")

CUT_POINTS = re.compile(r"(?<=[.!?;:,。！？；])\s+")
"""Where an overlong line may be cut: after sentence-internal punctuation followed by a space."""


@dataclass
class Translation:
    """One input line's result: n-best (text, score) pairs, and its subwords for attention output:
    all of them, and per piece the line was translated in (`parts`: (source, output) subwords)."""

    nbest: list[tuple[str, float]]
    src_ids: list[int]
    tgt_ids: list[int]
    parts: list[tuple[list[int], list[int]]] = field(default_factory=list)


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
            out[i] = Translation(list(zip(decoded, [h.score for h in hyps])), src_ids, hyps[0].tokens,
                                 [(sources[js[0]], hyps[0].tokens)])
        else:
            out[i] = Translation([(" ".join(decoded), sum(h.score for h in hyps))], src_ids,
                                 [t for h in hyps for t in h.tokens],
                                 [(sources[j], h.tokens) for j, h in zip(js, hyps)])
    return out


Job = tuple[list[list[int]], int, list | None]
"""One batch for a search: its sources (ids, no EOS), the n-best size, each source's sampling
seed (decode.seed, line index, piece) or None."""


def source_limit(max_positions: int, max_len_offset: int, prefix: int = 0) -> int:
    """Longest source (subwords, a prefix tag included, EOS excluded) a model of `max_positions`
    reads with room for an output of source + `max_len_offset` subwords."""
    return max(max_positions - 1 - max_len_offset, prefix + 1)


def output_steps(source: int, max_len_offset: int, max_positions: int) -> int:
    """Decoding steps for a source of `source` subwords (EOS excluded), the last one EOS:
    source + EOS + offset, within the position table (search.py's per-sentence limit)."""
    return min(source + 1 + max_len_offset, max_positions - 1)


def translate_lines(vocab: Vocab, lines: list[str], search: Callable[[Job], list], limit: int, budget: int,
                    prefix: Sequence[int] = (), nbest: int = 1, first: int = 0, seed: int | None = None,
                    workers: int = 1, mapper: Callable[[Callable, list[Job]], Iterable] = map
                    ) -> list[Translation]:
    """Translate `lines` in input order: each non-empty line's sources (`pieces`: no longer than
    `limit`, each starting with `prefix`), in batches of at most `budget` source tokens
    (`rebalance` over `workers`), each batch a Job for `search`, which returns one n-best list of
    Hypothesis per source; `mapper(search, jobs)` runs them (map, or a worker pool's). `first` is
    the index of lines[0] in the whole input: warnings name lines by it, and with `seed` (sampling)
    each source's Job seed is (seed, its line's index, its piece)."""
    texts = [normalize(line) for line in lines]
    sources, owner, seeds = [], [], []  # every piece of every non-empty line, its line and seed
    for i, ids in enumerate(vocab.encode_src(texts)):
        if not texts[i]:
            continue  # an empty line translates to an empty line
        parts = pieces(vocab, texts[i], ids, limit, prefix)
        if len(parts) > 1:
            log.warning("line %d: %d subwords exceed the model's limit of %d; translating %d pieces",
                        first + i + 1, len(ids) + len(prefix), limit, len(parts))
        sources.extend(parts)
        owner.extend([i] * len(parts))
        seeds.extend([seed, first + i, k] for k in range(len(parts)))
    batches = rebalance([len(s) for s in sources], max(1, budget), workers)
    jobs = [([sources[j] for j in b], nbest, None if seed is None else [seeds[j] for j in b])
            for b in batches]
    found: list = [[] for _ in sources]
    for batch, hyps_of in zip(batches, mapper(search, jobs)):
        for j, hyps in zip(batch, hyps_of):
            found[j] = hyps
    return join(vocab, len(lines), sources, owner, found)
