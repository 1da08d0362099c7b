"""`mtkit prepare`: corpus -> cleaned pairs -> SentencePiece -> binary shards + manifest, streamed.

Two passes over the training split, never holding it in memory: the first draws the bounded sample
SentencePiece trains on; the second decodes, cleans, encodes and filters chunks of pairs in worker
processes (in order) and appends them to shards. The output directory appears whole or not at
all: everything is written to a temporary sibling that is renamed into place at the end.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, replace
from itertools import chain
from multiprocessing import get_context
from pathlib import Path

import numpy as np
from tqdm import tqdm

from mtkit import __version__
from mtkit.config import DataConfig, RunConfig, TokenizerConfig, config_to_dict, corpus_name
from mtkit.data.corpus import (
    Chunk,
    SeenPairs,
    clean_pairs,
    decode_chunk,
    pair_hashes,
    read_chunks,
    split_sources,
)
from mtkit.data.shards import FORMAT, MANIFEST, ShardWriter, id_dtype, sampled_pairs
from mtkit.data.vocab import Vocab, load_processor, marian_pieces, sample_pairs, sample_size, train_vocab
from mtkit.errors import UserError
from mtkit.io import atomic_dir, atomic_dir_leftovers, cause, exclusive

log = logging.getLogger("mtkit")

CHUNK_PAIRS = 10_000
"""Pairs per unit of work sent to a worker."""
AUTO_IN_PROCESS_BELOW = 100_000
"""num_proc auto: training splits smaller than this are encoded in-process (workers cost more)."""


@dataclass(frozen=True)
class Filters:
    """What happens to a chunk's pairs after decoding and cleaning."""

    max_len: int | None
    """Drop pairs with more subwords than this on either side; None: keep every pair (evaluation splits)."""
    max_ratio: float | None
    """Drop pairs whose length ratio exceeds this (with max_len only); None: off."""
    hashes: bool
    """Return pair hashes for deduplication."""
    text: bool
    """Return the cleaned text (written beside the shards of evaluation splits)."""
    dtypes: tuple[str, str]
    """Source and target id dtypes."""
    tag: int | None = None
    """Id put in front of every source sentence (the corpus' tag); None: none."""


@dataclass
class Encoded:
    """One chunk's kept pairs: concatenated ids and lengths per side, and what was dropped."""

    src: np.ndarray
    src_lens: np.ndarray
    tgt: np.ndarray
    tgt_lens: np.ndarray
    dropped: dict[str, int]
    hashes: list[bytes] | None
    text: tuple[list[str], list[str]] | None

    def select(self, keep: np.ndarray) -> Encoded:
        """The pairs where `keep` is True (text and hashes are not carried)."""
        return Encoded(self.src[np.repeat(keep, self.src_lens)], self.src_lens[keep],
                       self.tgt[np.repeat(keep, self.tgt_lens)], self.tgt_lens[keep],
                       self.dropped, None, None)


def _length_filter(s: np.ndarray, t: np.ndarray, f: Filters) -> tuple[np.ndarray, dict[str, int]]:
    """Mask of the pairs kept by the subword length and length-ratio filters, and the counts dropped."""
    too_long = (s > f.max_len) | (t > f.max_len)
    bad_ratio = np.zeros_like(too_long)
    if f.max_ratio is not None:
        bad_ratio = ~too_long & (np.maximum(s, t) > f.max_ratio * np.maximum(1, np.minimum(s, t)))
    return ~(too_long | bad_ratio), {"too_long": int(too_long.sum()), "length_ratio": int(bad_ratio.sum())}


def _flat(ids: list[list[int]], dtype: str) -> np.ndarray:
    return np.fromiter(chain.from_iterable(ids), dtype=dtype, count=sum(map(len, ids)))


def encode_chunk(chunk: Chunk, f: Filters, vocab: Vocab, threads: int | None = None) -> Encoded:
    """Decode, clean, encode and filter one chunk; errors name the file and line."""
    src, tgt, empty = clean_pairs(*decode_chunk(chunk))
    src_ids, tgt_ids = vocab.encode_src(src, threads), vocab.encode_tgt(tgt, threads)
    if f.tag is not None:
        src_ids = [[f.tag, *ids] for ids in src_ids]
    s = np.fromiter(map(len, src_ids), dtype=np.int32, count=len(src_ids))
    t = np.fromiter(map(len, tgt_ids), dtype=np.int32, count=len(tgt_ids))
    dropped = {"empty": empty}
    if f.max_len is not None:
        keep, more = _length_filter(s, t, f)
        dropped.update(more)
        if not keep.all():
            index = np.flatnonzero(keep)
            src, tgt = [src[i] for i in index], [tgt[i] for i in index]
            src_ids, tgt_ids, s, t = ([src_ids[i] for i in index], [tgt_ids[i] for i in index],
                                      s[keep], t[keep])
    return Encoded(_flat(src_ids, f.dtypes[0]), s, _flat(tgt_ids, f.dtypes[1]), t, dropped,
                   pair_hashes(src, tgt) if f.hashes else None, (src, tgt) if f.text else None)


_WORKER_VOCAB: Vocab | None = None  # set once per worker process by _init_worker


def _init_worker(state: dict) -> None:
    global _WORKER_VOCAB
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    _WORKER_VOCAB = Vocab.from_state(state)


def _encode_in_worker(chunk: Chunk, f: Filters) -> Encoded:
    return encode_chunk(chunk, f, _WORKER_VOCAB, threads=1)


def _ordered(pool: ProcessPoolExecutor, tasks: Iterable[tuple[Chunk, Filters]],
             depth: int) -> Iterator[Encoded]:
    """Results in task order with at most `depth` tasks in flight (Pool.imap would read the whole
    corpus into its queue)."""
    pending: deque = deque()
    for task in tasks:
        pending.append(pool.submit(_encode_in_worker, *task))
        if len(pending) >= depth:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def _num_proc(cfg: RunConfig, train_pairs: int) -> int:
    if cfg.data.num_proc != "auto":
        return cfg.data.num_proc
    return 1 if train_pairs < AUTO_IN_PROCESS_BELOW else len(os.sched_getaffinity(0))


@contextmanager
def _encoder(vocab: Vocab, procs: int) -> Iterator[Callable[[Iterable], Iterator[Encoded]]]:
    """A function mapping (chunk, filters) tasks to Encoded results, in order, on `procs` processes."""
    if procs == 1:
        yield lambda tasks: (encode_chunk(chunk, f, vocab) for chunk, f in tasks)
        return
    pool = ProcessPoolExecutor(procs, mp_context=get_context("spawn"), initializer=_init_worker,
                               initargs=(vocab.to_state(),))
    try:
        main = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN) if main else None  # inherited by the workers
        try:
            # every worker starts with SIGINT ignored
            for started in [pool.submit(int) for _ in range(procs)]:
                started.result()
        finally:
            if main:
                signal.signal(signal.SIGINT, previous)
        yield lambda tasks: _ordered(pool, tasks, depth=2 * procs)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


@dataclass(frozen=True)
class Corpus:
    """One corpus of a run: the `data:` block with its own keys, its name, weight and tag."""

    name: str
    data: DataConfig
    weight: float = 1.0
    tag: str | None = None
    key: str = "data"
    """Where it is configured, for error messages."""


_CORPUS_KEYS = ("src_lang", "tgt_lang", "format", "dir", "splits", "hub_name", "hub_config", "src_field",
                "tgt_field")


def corpora(cfg: RunConfig) -> list[Corpus]:
    """The run's corpora: `data.corpora`, each completed from the `data:` block, or that block alone."""
    d = cfg.data
    if not d.corpora:
        return [Corpus(f"{d.src_lang}-{d.tgt_lang}", d)]
    found = []
    for i, c in enumerate(d.corpora):
        data = replace(d, corpora=[], **{k: getattr(c, k) for k in _CORPUS_KEYS if getattr(c, k) is not None})
        found.append(Corpus(corpus_name(c, d), data, c.weight, c.tag, f"data.corpora[{i}]"))
    return found


def _read_model(path: str, key: str) -> bytes:
    try:
        model = Path(path).read_bytes()
        load_processor(model)
    except FileNotFoundError:
        raise UserError(f"{path}: SentencePiece model not found ({key})") from None
    except OSError as exc:
        raise UserError(f"{path}: cannot read ({cause(exc)}) ({key})") from None
    except ValueError as exc:
        raise UserError(f"{path}: {exc} ({key})") from None
    return model


def given_vocab(tok: TokenizerConfig) -> tuple[Vocab, str] | None:
    """The vocabulary the config brings (tokenizer.model, src_model + tgt_model, or from_model) and
    where it comes from; None when prepare is to train one."""
    if tok.from_model:
        from mtkit.checkpoint import load_checkpoint, resolve_model

        path = resolve_model(tok.from_model)
        return Vocab.from_state(load_checkpoint(path)["vocab"]), str(path)
    pieces = _read_id_map(tok.vocab) if tok.vocab else None
    where = f" with ids of {tok.vocab}" if tok.vocab else ""
    if tok.model:
        return Vocab(_read_model(tok.model, "tokenizer.model"), None, pieces), tok.model + where
    if tok.src_model:
        models = (_read_model(tok.src_model, "tokenizer.src_model"),
                  _read_model(tok.tgt_model, "tokenizer.tgt_model"))
        return Vocab(*models, pieces), f"{tok.src_model} + {tok.tgt_model}{where}"
    return None


def _read_id_map(path: str) -> list[str]:
    """tokenizer.vocab: Marian's vocab.json ({piece: id}), as mtkit's id map."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path}: vocabulary not found (tokenizer.vocab)") from None
    except (OSError, ValueError) as exc:
        raise UserError(f"{path}: not a readable JSON vocabulary ({cause(exc)}) (tokenizer.vocab)") from None
    return marian_pieces(data, f"{path} (tokenizer.vocab)")


def _train_chunks(found: list[Corpus]) -> Iterator[Chunk]:
    return chain.from_iterable(read_chunks(c.data, "train", CHUNK_PAIRS) for c in found)


def _sample_text(cfg: RunConfig, found: list[Corpus]) -> tuple[list[str], list[str], int]:
    """First pass over the training split: its cleaned sample for SentencePiece and its pair count."""
    with tqdm(desc="read train", unit=" pairs", disable=None, leave=False) as bar:
        chunks = (bar.update(len(chunk.items)) or chunk for chunk in _train_chunks(found))
        sample, seen = sample_pairs(chunks, sample_size(cfg.tokenizer), cfg.tokenizer.seed)
    src, tgt = [], []
    while sample and sample.items:  # a slice at a time, freeing the raw pairs as their text is made
        part = Chunk(sample.kind, sample.names, sample.items[:CHUNK_PAIRS],
                     numbers=sample.numbers[:CHUNK_PAIRS])
        del sample.items[:CHUNK_PAIRS], sample.numbers[:CHUNK_PAIRS]
        more_src, more_tgt, _ = clean_pairs(*decode_chunk(part))
        src += more_src
        tgt += more_tgt
    return src, tgt, seen


def _vocabulary(cfg: RunConfig, found: list[Corpus]) -> tuple[Vocab, int]:
    """The vocabulary given by the config, or one trained on the training split; and its pair count."""
    start, tok = time.time(), cfg.tokenizer
    tags = sorted({c.tag for c in found if c.tag})
    given = given_vocab(tok)
    if given is not None:
        vocab, source = given
        for c in found:
            if c.tag:
                try:
                    vocab.tag_id(c.tag)
                except UserError:
                    raise UserError(f"{c.key}.tag: {c.tag!r} is not a piece of {source}; a tag must be one "
                                    "piece (a user-defined symbol of that SentencePiece model)") from None
        seen = sum(len(chunk.items) for chunk in _train_chunks(found))
        log.info("encoding %d training pairs with the SentencePiece model of %s (fingerprint %s)", seen,
                 source, vocab.fingerprint)
        return vocab, seen
    src, tgt, seen = _sample_text(cfg, found)
    if not src:
        raise UserError("data.splits.train: no sentence pairs left after cleaning "
                        f"({', '.join(c.data.splits['train'] for c in found)})")
    log.info("read %d training pairs in %.1f s; training SentencePiece (%s, %d pieces, %s) on %d of them",
             seen, time.time() - start, tok.type, tok.vocab_size, "joint" if tok.joint else "separate",
             len(src))
    start = time.time()
    vocab = train_vocab(src, tgt, tok, tags)
    log.info("trained SentencePiece in %.1f s", time.time() - start)
    return vocab, seen


class _TextWriter:
    """The cleaned text of an evaluation split, one file per side."""

    def __init__(self, directory: Path, split: str):
        self.files = [open(directory / f"{split}.{side}.txt", "w", encoding="utf-8", newline="\n")
                      for side in ("src", "tgt")]  # closed in close()

    def write(self, text: tuple[list[str], list[str]]) -> None:
        for f, lines in zip(self.files, text):
            f.write("".join(f"{line}\n" for line in lines))

    def close(self) -> None:
        for f in self.files:
            f.close()


def _write_split(encode: Callable, cfg: RunConfig, vocab: Vocab, name: str, tmp: Path,
                 found: list[Corpus]) -> dict:
    """Second pass over one split: each corpus' encoded chunks -> (dedup) -> shards, one after the
    other; returns its manifest entry with each corpus' range of pairs."""
    d, train, start = cfg.data, name == "train", time.time()
    dtypes = (id_dtype(vocab.src_size).name, id_dtype(vocab.tgt_size).name)
    writer = ShardWriter(tmp, name, d.shard_size, (np.dtype(dtypes[0]), np.dtype(dtypes[1])))
    text = None if train else _TextWriter(tmp, name)
    seen = SeenPairs(tmp / ".dedup.sqlite") if train and d.dedup else None
    dropped = {"empty": 0, **({"too_long": 0, "length_ratio": 0} if train else {}),
               **({"duplicate": 0} if seen else {})}
    parts, sources = [], []
    bar = tqdm(desc=f"encode {name}", unit=" pairs", disable=None, leave=False)
    try:
        for c in found:
            f = Filters(d.max_tokens_per_sentence if train else None, d.max_length_ratio, seen is not None,
                        not train, dtypes, vocab.tag_id(c.tag) if c.tag else None)
            first, own = writer.pairs, dict.fromkeys(dropped, 0)
            for enc in encode((chunk, f) for chunk in read_chunks(c.data, name, CHUNK_PAIRS)):
                for key, count in enc.dropped.items():
                    own[key] += count
                if text:
                    text.write(enc.text)
                if seen:
                    keep = seen.first_seen(enc.hashes)
                    own["duplicate"] += int((~keep).sum())
                    enc = enc.select(keep)
                writer.append(enc.src, enc.src_lens, enc.tgt, enc.tgt_lens)
                bar.update(len(enc.src_lens))
            part = {"name": c.name, "src_lang": c.data.src_lang, "tgt_lang": c.data.tgt_lang, "tag": c.tag,
                    "start": first, "pairs": writer.pairs - first, "dropped": own}
            if train:
                part.update(weight=c.weight, sampled_pairs=sampled_pairs(part["pairs"], c.weight))
            parts.append(part)
            sources += split_sources(c.data, name)
            for key, count in own.items():
                dropped[key] += count
    finally:
        bar.close()
        entry = writer.close()
        if text:
            text.close()
        if seen:
            seen.close()
            (tmp / ".dedup.sqlite").unlink()
    entry.update(dropped=dropped, sources=sources, corpora=parts)
    log.info("encoded %s in %.1f s: %d pairs, %d + %d tokens, %d shard(s); dropped %s", name,
             time.time() - start, entry["pairs"], entry["src_tokens"], entry["tgt_tokens"],
             len(entry["src"]["shards"]), dropped)
    if train and any(c.weight != 1 for c in found):
        log.info("training pairs per epoch with the corpus weights: %s", ", ".join(
            f"{p['name']} {p['pairs']} x {p['weight']:g} = {p['sampled_pairs']}" for p in parts))
    return entry


def _write_manifest(cfg: RunConfig, vocab: Vocab, splits: dict, tmp: Path) -> None:
    (tmp / "spm.src.model").write_bytes(vocab.src_model)
    if not vocab.joint:
        (tmp / "spm.tgt.model").write_bytes(vocab.tgt_model)
    if vocab.id_map is not None:
        (tmp / "pieces.json").write_text(json.dumps(vocab.id_map, ensure_ascii=False), encoding="utf-8")
    manifest = {
        "format": FORMAT, "mtkit_version": __version__,
        "src_lang": cfg.data.src_lang, "tgt_lang": cfg.data.tgt_lang,
        "vocab": {"src_model": "spm.src.model", "tgt_model": None if vocab.joint else "spm.tgt.model",
                  "pieces": None if vocab.id_map is None else "pieces.json",
                  "src_size": vocab.src_size, "tgt_size": vocab.tgt_size, "joint": vocab.joint,
                  "fingerprint": vocab.fingerprint},
        "splits": splits, "config": config_to_dict(cfg),
    }
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2), encoding="utf-8")


def _check_replaceable(out: Path, force: bool) -> None:
    """`--force` replaces only what `prepare` made: a directory with its manifest, or an empty one."""
    if not out.exists() and not out.is_symlink():
        return
    if not force:
        raise UserError(f"{out}: already exists; pass --force to replace it")
    if not out.is_dir() or out.is_symlink():
        raise UserError(f"{out}: not a directory; --force replaces only a prepared directory")
    if (out / MANIFEST).is_file() or not any(out.iterdir()):
        return
    raise UserError(f"{out}: not a prepared directory (no {MANIFEST}) and not empty; --force replaces only "
                    "what mtkit prepare made: choose another data.prepared_dir")


def _remove_leftovers(out: Path) -> None:
    """Temporary directories of a prepare that was killed (this process holds the lock, so no
    prepare is writing them); an old copy left by a swap cut short is put back if `out` is gone."""
    for old in atomic_dir_leftovers(out, "old"):
        if not out.exists():
            os.replace(old, out)
            log.warning("restored %s from %s, left by an interrupted prepare", out, old.name)
        else:
            shutil.rmtree(old, ignore_errors=True)
    for tmp in atomic_dir_leftovers(out, "tmp"):
        shutil.rmtree(tmp, ignore_errors=True)
        log.warning("removed %s, left by an interrupted prepare", tmp)


def prepare(cfg: RunConfig, force: bool = False) -> Path:
    """Run the whole preparation; returns the prepared directory, replaced whole or not at all.

    One prepare at a time per directory (an OS lock beside it); `force` replaces only a directory
    that prepare made.
    """
    out = Path(cfg.data.prepared_dir)
    _check_replaceable(out, force)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"{out.parent}: cannot create ({cause(exc)})") from None
    with exclusive(out.parent / f".{out.name}.lock", str(out), remove=True):
        _remove_leftovers(out)
        _check_replaceable(out, force)  # again: another process may have written it meanwhile
        start, found = time.time(), corpora(cfg)
        vocab, train_pairs = _vocabulary(cfg, found)
        names = list(dict.fromkeys(name for c in found for name in c.data.splits))
        with atomic_dir(out) as tmp:  # the old directory stays until the new one is complete
            procs = _num_proc(cfg, train_pairs)
            log.info("encoding with %d process%s", procs, "es" if procs > 1 else "")
            with _encoder(vocab, procs) as encode:
                splits = {name: _write_split(encode, cfg, vocab, name, tmp,
                                             [c for c in found if name in c.data.splits]) for name in names}
            _write_manifest(cfg, vocab, splits, tmp)
    log.info("prepared %s in %.1f s", out, time.time() - start)
    return out
