"""Reading parallel text (local files or `datasets`) and the cleaning filters of `prepare`.

Splits are streamed in chunks of raw pairs; `decode_chunk` and the filters run where `prepare`
puts them (worker processes), so no split is ever held in memory whole.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import sqlite3
import sys
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from itertools import islice, zip_longest
from pathlib import Path
from typing import BinaryIO, Literal

import numpy as np

from mtkit.config import DataConfig
from mtkit.errors import UserError
from mtkit.io import cause, open_bytes

log = logging.getLogger("mtkit")


def read_lines(path: str | Path, errors: Literal["strict", "replace"] = "strict") -> list[str]:
    """Lines of a plain or gzipped UTF-8 file, split on '\\n' only.

    `datasets`' text builder opens files with universal newlines, so a lone '\\r' or U+2028 inside
    a sentence would split it and shift every later line against the other language; reading
    bytes and splitting on '\\n' keeps line i of one side aligned with line i of the other.
    """
    path = Path(path)
    try:
        with open_bytes(path) as f:
            data = f.read()
    except (OSError, EOFError, zlib.error) as exc:
        raise UserError(f"{path}: cannot read ({cause(exc)})") from None
    return decode_lines(data, str(path), errors)


def stream_lines(path: str | Path | None, errors: Literal["strict", "replace"] = "strict") -> Iterator[str]:
    """Lines of a file (plain or .gz) or of stdin (None or '-'), read lazily; a missing or
    unreadable file is an error before the first line."""
    if path is None or str(path) == "-":
        return iter_lines(sys.stdin.buffer, "<stdin>", errors)
    stream = open_bytes(path)
    return _closing(iter_lines(stream, str(path), errors), stream)


def _closing(lines: Iterator[str], stream: BinaryIO) -> Iterator[str]:
    with stream:
        yield from lines


def decode_lines(data: bytes, name: str, errors: Literal["strict", "replace"] = "strict") -> list[str]:
    """Split bytes into lines on '\\n' alone (a final newline ends the last line) and decode UTF-8."""
    return list(iter_lines(io.BytesIO(data), name, errors))


def utf8_line(raw: bytes, name: str, number: int) -> str:
    """One line's bytes as text, its line end ('\n', '\r\n') dropped; invalid UTF-8 is an error
    naming the file and line."""
    try:
        return raw.removesuffix(b"\n").removesuffix(b"\r").decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"{name}: line {number}: invalid UTF-8 ({exc.reason})") from None


def iter_lines(stream: BinaryIO, name: str, errors: Literal["strict", "replace"] = "strict") -> Iterator[str]:
    """Lines of a binary stream, split on '\\n' alone (a CR before it is dropped), decoded lazily.

    Invalid UTF-8 is an error naming the line; with errors="replace" it becomes U+FFFD and a
    warning names how many lines and the first.
    """
    replaced, number = [], 0
    try:
        for number, raw in enumerate(stream, 1):  # binary iteration splits on b"\n" only
            try:
                text = utf8_line(raw, name, number)
            except UserError:
                if errors == "strict":
                    raise
                replaced.append(number)
                text = raw.removesuffix(b"\n").removesuffix(b"\r").decode("utf-8", errors="replace")
            yield text
    except (OSError, EOFError, zlib.error) as exc:  # a corrupt or truncated .gz, a failing disk
        raise UserError(f"{name}: cannot read past line {number} ({cause(exc)})") from None
    finally:
        if replaced:
            log.warning("%s: invalid UTF-8 replaced by U+FFFD in %d line(s), first line %d",
                        name, len(replaced), replaced[0])


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _field(record: dict, path: str, where: str) -> str:
    value = record
    for part in path.split("."):
        if not isinstance(value, dict) or part not in value:
            raise UserError(f"{where}: record has no field '{path}' (fields: {', '.join(record)})")
        value = value[part]
    if not isinstance(value, str):
        raise UserError(f"{where}: field '{path}' is {type(value).__name__}, not text")
    return value


def _resolve(cfg: DataConfig, pattern: str, lang: str | None = None) -> Path:
    name = pattern.replace("{lang}", lang) if lang else pattern
    base = Path(os.path.expandvars(cfg.dir)) if cfg.dir else Path()
    return base / os.path.expandvars(name)


@dataclass
class Chunk:
    """Consecutive raw pairs of one split, as read; `decode_chunk` turns them into text."""

    kind: Literal["text", "tsv", "records"]
    """text: (source line, target line) as bytes; tsv: one line as bytes; records: (source, target) text."""
    names: tuple[str, str]
    """Where the source and the target are read from, for error messages (one file twice for tsv)."""
    items: list
    """The raw pairs."""
    first: int = 1
    """Line (record) number of items[0]; the others follow on."""
    numbers: list[int] | None = None
    """Line numbers of the items when they do not follow on (a sample)."""

    def number(self, i: int) -> int:
        """Line (record) number of items[i]."""
        return self.numbers[i] if self.numbers is not None else self.first + i


def _decode(raw: bytes, chunk: Chunk, side: int, i: int) -> str:
    return utf8_line(raw, chunk.names[side], chunk.number(i))


def decode_chunk(chunk: Chunk) -> tuple[list[str], list[str]]:
    """A chunk's pairs as text: UTF-8 decoded, line ends dropped, tsv split; errors name the file and line."""
    if chunk.kind == "records":
        return [s for s, _ in chunk.items], [t for _, t in chunk.items]
    src, tgt = [], []
    if chunk.kind == "tsv":
        for i, raw in enumerate(chunk.items):
            cols = _decode(raw, chunk, 0, i).split("\t")
            if len(cols) != 2:
                raise UserError(f"{chunk.names[0]}: line {chunk.number(i)}: expected 2 tab-separated "
                                f"columns, found {len(cols)}")
            src.append(cols[0])
            tgt.append(cols[1])
        return src, tgt
    for i, (s, t) in enumerate(chunk.items):
        src.append(_decode(s, chunk, 0, i))
        tgt.append(_decode(t, chunk, 1, i))
    return src, tgt


def _raw_lines(stream: BinaryIO, path: Path) -> Iterator[bytes]:
    """Undecoded lines (binary iteration splits on b"\\n" only); a read error mid-file names the file."""
    try:
        yield from stream
    except (OSError, EOFError, zlib.error) as exc:  # a corrupt or truncated .gz, a failing disk
        raise UserError(f"{path}: cannot read ({cause(exc)})") from None


def _text_paths(cfg: DataConfig, split: str) -> tuple[Path, Path]:
    spec = cfg.splits[split]
    if "{lang}" not in spec:
        raise UserError(f"data.splits.{split}: {spec!r} needs '{{lang}}' for format text, "
                        f"e.g. train.{{lang}}.gz")
    return _resolve(cfg, spec, cfg.src_lang), _resolve(cfg, spec, cfg.tgt_lang)


def _text_chunks(src_path: Path, tgt_path: Path, size: int) -> Iterator[Chunk]:
    """Line pairs of two files; differing line counts are an error naming both counts."""
    names = (str(src_path), str(tgt_path))
    with open_bytes(src_path) as fs, open_bytes(tgt_path) as ft:
        pairs = zip_longest(_raw_lines(fs, src_path), _raw_lines(ft, tgt_path))
        first = 1
        while items := list(islice(pairs, size)):
            if items[-1][0] is None or items[-1][1] is None:  # one file ended before the other
                counts = [first - 1 + sum(x is not None for x in side) for side in zip(*items)]
                for s, t in pairs:
                    counts[0], counts[1] = counts[0] + (s is not None), counts[1] + (t is not None)
                raise UserError(f"{src_path} has {counts[0]} lines but {tgt_path} has {counts[1]}: "
                                "a parallel corpus needs equal counts")
            yield Chunk("text", names, items, first)
            first += len(items)


def _tsv_chunks(path: Path, size: int) -> Iterator[Chunk]:
    with open_bytes(path) as f:
        lines, first = _raw_lines(f, path), 1
        while items := list(islice(lines, size)):
            yield Chunk("tsv", (str(path), str(path)), items, first)
            first += len(items)


def _records(ds: Iterable, where: str) -> Iterator[dict]:
    try:
        yield from ds
    except Exception as exc:  # datasets and pyarrow raise many types; all mean "cannot read"
        raise UserError(f"{where}: cannot read through datasets ({str(exc).splitlines()[0]})") from None


def _record_chunks(cfg: DataConfig, split: str, size: int) -> Iterator[Chunk]:
    """jsonl or hub records, streamed through `datasets` (streaming=True: nothing cached whole)."""
    import datasets  # heavy import, only where needed

    datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # its errors become our one line
    datasets.disable_progress_bars()
    spec = cfg.splits[split]
    if cfg.format == "jsonl":
        path = _resolve(cfg, spec)
        if not path.is_file():
            raise UserError(f"{path}: file not found (data.splits.{split})")
        where = str(path)
        args, kwargs = ("json",), {"data_files": where, "split": "train"}
    else:
        where = f"{cfg.hub_name}[{cfg.hub_config or ''}]:{spec}"
        args, kwargs = (cfg.hub_name, cfg.hub_config), {"split": spec}
    try:
        records = _records(datasets.load_dataset(*args, **kwargs, streaming=True), where)
    except Exception as exc:  # as above
        raise UserError(f"{where}: cannot load through datasets ({str(exc).splitlines()[0]})") from None
    src_field, tgt_field = cfg.src_field or cfg.src_lang, cfg.tgt_field or cfg.tgt_lang
    first = 1
    while batch := list(islice(records, size)):
        items = [(_field(r, src_field, f"{where} record {first + i}"),
                  _field(r, tgt_field, f"{where} record {first + i}")) for i, r in enumerate(batch)]
        yield Chunk("records", (where, where), items, first)
        first += len(items)


def read_chunks(cfg: DataConfig, split: str, size: int) -> Iterator[Chunk]:
    """One split's raw pairs in chunks of `size`, streamed from its files or through `datasets`."""
    if cfg.format in ("jsonl", "hub"):
        return _record_chunks(cfg, split, size)
    if cfg.format == "tsv":
        return _tsv_chunks(_resolve(cfg, cfg.splits[split]), size)
    return _text_chunks(*_text_paths(cfg, split), size)


def split_sources(cfg: DataConfig, split: str) -> list[str]:
    """Files (with sha256) or hub coordinates a split was read from, for the manifest."""
    spec = cfg.splits[split]
    if cfg.format == "hub":
        return [f"{cfg.hub_name}[{cfg.hub_config or ''}]:{spec}"]
    paths = _text_paths(cfg, split) if cfg.format == "text" else (_resolve(cfg, spec),)
    return [f"{p} sha256:{file_sha256(p)}" for p in paths]


def normalize(text: str) -> str:
    """Collapse runs of whitespace (tabs, form feeds, U+2028 ...) to one space; strip the ends."""
    return " ".join(text.split())


def clean_pairs(src: list[str], tgt: list[str]) -> tuple[list[str], list[str], int]:
    """Normalise whitespace and drop pairs with an empty side; returns the pairs kept and the count
    dropped."""
    kept_src, kept_tgt = [], []
    for s, t in zip(src, tgt):
        s, t = normalize(s), normalize(t)
        if s and t:
            kept_src.append(s)
            kept_tgt.append(t)
    return kept_src, kept_tgt, len(src) - len(kept_src)


def pair_hashes(src: list[str], tgt: list[str]) -> list[bytes]:
    """128-bit hashes of cleaned pairs (a tab cannot occur inside a cleaned sentence)."""
    return [hashlib.blake2b(f"{s}\t{t}".encode(), digest_size=16).digest() for s, t in zip(src, tgt)]


class SeenPairs:
    """Exact-duplicate detection over pair hashes kept in an on-disk SQLite table: the process holds
    only a bounded page cache however large the corpus."""

    def __init__(self, path: Path, cache_mb: int = 64):
        self.db = sqlite3.connect(path)
        self.db.executescript("PRAGMA journal_mode=OFF; PRAGMA synchronous=OFF; "
                              f"PRAGMA cache_size=-{cache_mb * 1024};"
                              "CREATE TABLE seen (h BLOB PRIMARY KEY) WITHOUT ROWID;")

    def first_seen(self, hashes: list[bytes]) -> np.ndarray:
        """Mask of the hashes seen neither earlier in the list nor in an earlier call; remembers them."""
        first: dict[bytes, int] = {}
        for i, h in enumerate(hashes):
            first.setdefault(h, i)
        candidates, old = list(first), set()
        for start in range(0, len(candidates), 500):  # under SQLite's limit on bound parameters
            part = candidates[start : start + 500]
            query = f"SELECT h FROM seen WHERE h IN ({','.join('?' * len(part))})"
            old.update(row[0] for row in self.db.execute(query, part))
        new = [h for h in candidates if h not in old]
        self.db.executemany("INSERT INTO seen VALUES (?)", [(h,) for h in new])
        keep = np.zeros(len(hashes), dtype=bool)
        keep[[first[h] for h in new]] = True
        return keep

    def close(self) -> None:
        self.db.close()
