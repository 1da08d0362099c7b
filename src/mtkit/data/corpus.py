"""Reading parallel text (local files or `datasets`) and the cleaning filters of `prepare`."""

from __future__ import annotations

import gzip
import hashlib
import io
import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Iterator
from typing import BinaryIO, Literal

from mtkit.config import DataConfig
from mtkit.errors import UserError

log = logging.getLogger("mtkit")


@dataclass
class Split:
    """One split's sentence pairs and where they came from."""

    name: str
    src: list[str]
    tgt: list[str]
    sources: list[str] = field(default_factory=list)
    """Files (with sha256) or hub coordinates the pairs were read from, for the manifest."""


def read_lines(path: str | Path, errors: Literal["strict", "replace"] = "strict") -> list[str]:
    """Lines of a plain or gzipped UTF-8 file, split on '\\n' only.

    `datasets`' text builder opens files with universal newlines, so a lone '\\r' or U+2028 inside
    a sentence would split it and shift every later line against the other language; reading
    bytes and splitting on '\\n' keeps line i of one side aligned with line i of the other.
    """
    path = Path(path)
    try:
        with (gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")) as f:
            data = f.read()
    except FileNotFoundError:
        raise UserError(f"{path}: file not found") from None
    except (OSError, EOFError) as exc:
        raise UserError(f"{path}: cannot read ({exc})") from None
    return decode_lines(data, str(path), errors)


def stream_lines(path: str | Path | None, errors: Literal["strict", "replace"] = "strict") -> Iterator[str]:
    """Lines of a file (plain or .gz) or of stdin (None or '-'), read lazily; a missing or
    unreadable file is an error before the first line."""
    if path is None or str(path) == "-":
        return iter_lines(sys.stdin.buffer, "<stdin>", errors)
    path = Path(path)
    try:
        stream = gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")
        stream.peek(1)  # a directory or unreadable file fails here, not half-way
    except FileNotFoundError:
        raise UserError(f"{path}: file not found") from None
    except (OSError, EOFError) as exc:
        raise UserError(f"{path}: cannot read ({exc.strerror or exc})") from None
    return _closing(iter_lines(stream, str(path), errors), stream)


def _closing(lines: Iterator[str], stream: BinaryIO) -> Iterator[str]:
    with stream:
        yield from lines


def decode_lines(data: bytes, name: str, errors: Literal["strict", "replace"] = "strict") -> list[str]:
    """Split bytes into lines on '\\n' alone (a final newline ends the last line) and decode UTF-8."""
    return list(iter_lines(io.BytesIO(data), name, errors))


def iter_lines(stream: BinaryIO, name: str, errors: Literal["strict", "replace"] = "strict") -> Iterator[str]:
    """Lines of a binary stream, split on '\\n' alone (a CR before it is dropped), decoded lazily.

    Invalid UTF-8 is an error naming the line; with errors="replace" it becomes U+FFFD and a
    warning names how many lines and the first.
    """
    replaced = []
    try:
        for number, raw in enumerate(stream, 1):  # binary iteration splits on b"\n" only
            raw = raw.removesuffix(b"\n").removesuffix(b"\r")
            try:
                yield raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                if errors == "strict":
                    raise UserError(f"{name}: line {number}: invalid UTF-8 ({exc.reason})") from None
                replaced.append(number)
                yield raw.decode("utf-8", errors="replace")
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


def _field(record: dict, path: str, where: str):
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


def _read_records(cfg: DataConfig, split: str, spec: str) -> Split:
    """jsonl or hub records through `datasets`."""
    import datasets  # heavy import, only where needed

    datasets.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    src_field, tgt_field = cfg.src_field or cfg.src_lang, cfg.tgt_field or cfg.tgt_lang
    if cfg.format == "jsonl":
        path = _resolve(cfg, spec)
        if not path.is_file():
            raise UserError(f"{path}: file not found (data.splits.{split})")
        where, sources = str(path), [f"{path} sha256:{file_sha256(path)}"]
        load = lambda: datasets.load_dataset("json", data_files=str(path), split="train")  # noqa: E731
    else:
        where = f"{cfg.hub_name}[{cfg.hub_config or ''}]:{spec}"
        sources = [where]
        load = lambda: datasets.load_dataset(cfg.hub_name, cfg.hub_config, split=spec)  # noqa: E731
    try:
        ds = load()
    except Exception as exc:  # datasets raises many types; all mean "could not load this"
        raise UserError(f"{where}: cannot load through datasets ({str(exc).splitlines()[0]})") from None
    src, tgt = [], []
    for i, record in enumerate(ds, 1):
        src.append(_field(record, src_field, f"{where} record {i}"))
        tgt.append(_field(record, tgt_field, f"{where} record {i}"))
    return Split(split, src, tgt, sources)


def read_split(cfg: DataConfig, split: str) -> Split:
    """Read one split as aligned pairs; mismatched line counts are an error naming both."""
    spec = cfg.splits[split]
    if cfg.format in ("jsonl", "hub"):
        return _read_records(cfg, split, spec)
    if cfg.format == "tsv":
        path = _resolve(cfg, spec)
        src, tgt = [], []
        for number, line in enumerate(read_lines(path), 1):
            cols = line.split("\t")
            if len(cols) != 2:
                raise UserError(f"{path}: line {number}: expected 2 tab-separated columns, found {len(cols)}")
            src.append(cols[0])
            tgt.append(cols[1])
        return Split(split, src, tgt, [f"{path} sha256:{file_sha256(path)}"])
    if "{lang}" not in spec:
        raise UserError(f"data.splits.{split}: {spec!r} needs '{{lang}}' for format text, e.g. train.{{lang}}.gz")
    src_path, tgt_path = _resolve(cfg, spec, cfg.src_lang), _resolve(cfg, spec, cfg.tgt_lang)
    src, tgt = read_lines(src_path), read_lines(tgt_path)
    if len(src) != len(tgt):
        raise UserError(f"{src_path} has {len(src)} lines but {tgt_path} has {len(tgt)}: a parallel corpus needs equal counts")
    sources = [f"{p} sha256:{file_sha256(p)}" for p in (src_path, tgt_path)]
    return Split(split, src, tgt, sources)


def normalize(text: str) -> str:
    """Collapse runs of whitespace (tabs, form feeds, U+2028 ...) to one space; strip the ends."""
    return " ".join(text.split())


def clean(split: Split) -> tuple[Split, dict[str, int]]:
    """Normalise whitespace and drop pairs with an empty side; returns the counts dropped."""
    src, tgt, empty = [], [], 0
    for s, t in zip(split.src, split.tgt):
        s, t = normalize(s), normalize(t)
        if not s or not t:
            empty += 1
            continue
        src.append(s)
        tgt.append(t)
    return Split(split.name, src, tgt, split.sources), {"empty": empty}


def length_filter(src_ids: list[list[int]], tgt_ids: list[list[int]], max_len: int,
                  max_ratio: float | None) -> tuple[list[int], dict[str, int]]:
    """Indices of pairs kept by the subword length and length-ratio filters, and the counts dropped."""
    keep, too_long, bad_ratio = [], 0, 0
    for i, (s, t) in enumerate(zip(src_ids, tgt_ids)):
        if len(s) > max_len or len(t) > max_len:
            too_long += 1
        elif max_ratio is not None and max(len(s), len(t)) > max_ratio * max(1, min(len(s), len(t))):
            bad_ratio += 1
        else:
            keep.append(i)
    return keep, {"too_long": too_long, "length_ratio": bad_ratio}
