"""Where `mtkit translate` writes: translations (stdout or a file written whole), n-best lists,
and per line attention (PNG heatmaps, JSON weights or a self-contained HTML page) and hard
alignments.

Attention files in the --attention directory, NNNNNN the line number from 1 (an empty line has
none): png, `NNNNNN.png` for a line read whole, `NNNNNN-K.png` for piece K (from 1) of a line
translated in pieces, with `.cross`, `.encoder` or `.decoder` before `.png` when every kind is
drawn; json, `NNNNNN.json`; html, `NNNNNN.html` (one file per line, all its pieces inside)."""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from mtkit.attention import (
    KINDS,
    attention_html,
    attention_maps,
    hard_alignment,
    heads_of,
    pharaoh,
    save_heatmap,
)
from mtkit.errors import UserError
from mtkit.io import atomic_file, write_text
from mtkit.translate import Translation, Translator

log = logging.getLogger("mtkit")

ATTENTION_KINDS = (*KINDS, "all")
"""What --attention draws: one kind of attention, or all three (a file each)."""
ATTENTION_FORMATS = ("png", "html", "json")
"""How --attention writes: heatmaps, a self-contained page per line, or every weight as JSON."""

Head = int | str | None
"""One head (from 0), None for the mean of the heads, or "all" for a grid of every head."""


@dataclass
class Outputs:
    """Where `translate_to` writes: translations (stdout when None), n-best size, the streaming
    window, and optional attention files and hard alignments: the attention of `layer` (-1: the
    last) and `head` (see Head), of `attention_kind` (ATTENTION_KINDS), in `attention_format`."""

    output: Path | None = None
    nbest: int = 1
    window: int = 1000
    attention_dir: Path | None = None
    alignment: Path | None = None
    layer: int = -1
    head: Head = None
    attention_kind: str = "cross"
    attention_format: str = "png"

    def check(self, model=None) -> None:
        """Every option is spelled right and, given the `model`, one it can answer: a UserError
        naming the first that is not."""
        if self.attention_kind not in ATTENTION_KINDS:
            raise UserError(f"--attention-kind {self.attention_kind!r}: expected "
                            f"{', '.join(ATTENTION_KINDS)}")
        if self.attention_format not in ATTENTION_FORMATS:
            raise UserError(f"--attention-format {self.attention_format!r}: expected "
                            f"{', '.join(ATTENTION_FORMATS)}")
        if model is None:
            return
        layers = len(model.encoder) if self.attention_kind == "encoder" else len(model.decoder)
        if not -layers <= self.layer < layers:
            raise UserError(f"--layer {self.layer}: the model has {layers} layers (0 to {layers - 1}, "
                            "or -1 for the last)")
        heads = model.cfg.n_heads
        if isinstance(self.head, int) and not 0 <= self.head < heads:
            raise UserError(f"--head {self.head}: the model has {heads} heads (0 to {heads - 1})")


def parse_head(text: str | None) -> Head:
    """--head as given: N (a head from 0), avg (or nothing: the mean of the heads), or all."""
    if text is None or text == "avg":
        return None
    if text == "all":
        return "all"
    try:
        return int(text)
    except ValueError:
        raise UserError(f"--head {text!r}: expected a head number from 0, avg or all") from None


@contextmanager
def _atomic_text(path: Path | None) -> Iterator[TextIO]:
    """stdout as is; a file written whole or not at all (`mtkit.io.atomic_file`)."""
    if path is None or str(path) == "-":
        yield sys.stdout
        sys.stdout.flush()
        return
    with atomic_file(path) as f:
        yield f


def joined_alignment(pairs: list[list[tuple[int, int]]], lengths: list[tuple[int, int]],
                     prefix: int = 0) -> list[tuple[int, int]]:
    """(source, target) pairs of a line translated in pieces, over the whole line: each piece's
    pairs (`pairs`) shifted past the source and output subwords of the pieces before it
    (`lengths`: each piece's source and output subword counts). Every piece's source starts with
    the same `prefix` tag subwords; they count once, first, as in a line read whole."""
    joined, src_start, tgt_start = [], 0, 0
    for piece, (n_src, n_tgt) in zip(pairs, lengths):
        joined.extend((s if s < prefix else s + src_start, t + tgt_start) for s, t in piece)
        src_start += n_src - prefix
        tgt_start += n_tgt
    return joined


def _shorten(text: str, limit: int = 120) -> str:
    """`text` cut to `limit` characters, an ellipsis last where it was cut."""
    return text if len(text) <= limit else text[: limit - 1] + "…"


def write_attention(translator: Translator, n: int, result: Translation, maps_of_pieces: list[dict],
                    out: Outputs) -> None:
    """The attention files of line `n` (see the module's docstring), translated as `result`, from
    `maps_of_pieces`, the `attention_maps` of each of its pieces; every file is written whole."""
    directory, text = out.attention_dir, result.nbest[0][0]
    vocab = translator.vocab
    labels = [(vocab.src_pieces_of(src), vocab.tgt_pieces_of(tgt)) for src, tgt in result.parts]
    if out.attention_format != "png":
        entry = {"line": n, "text": text, "records": translator.attention(result, maps_of_pieces)}
        if out.attention_format == "json":
            write_text(directory / f"{n:06d}.json",
                       json.dumps(entry, ensure_ascii=False, separators=(",", ":")) + "\n")
        else:
            write_text(directory / f"{n:06d}.html", attention_html([entry], f"mtkit attention: line {n}"))
        return
    kinds = KINDS if out.attention_kind == "all" else (out.attention_kind,)
    whole = len(maps_of_pieces) == 1
    outputs = [text] if whole else vocab.decode_tgt([tgt for _, tgt in result.parts])
    for k, (maps, names, said) in enumerate(zip(maps_of_pieces, labels, outputs), 1):
        stem, where = (f"{n:06d}", f"line {n}") if whole else (f"{n:06d}-{k}", f"line {n}.{k}")
        for kind in kinds:
            layers, heads = maps[kind].shape[:2]
            what = {None: f"mean of {heads} heads", "all": f"{heads} heads"}.get(out.head, f"head {out.head}")
            title = f"{where}: {kind} attention, layer {out.layer % layers}, {what}\n{_shorten(said)}"
            name = f"{stem}.{kind}.png" if out.attention_kind == "all" else f"{stem}.png"
            save_heatmap(heads_of(maps[kind][out.layer], out.head), *names, directory / name, title, kind)


def translate_to(translator: Translator, lines: Iterable[str], out: Outputs) -> int:
    """Stream `lines` through the translator into `out`, window by window; returns the line count."""
    if out.attention_dir is not None:
        out.attention_dir.mkdir(parents=True, exist_ok=True)
    count = 0
    with _atomic_text(out.output) as text, ExitStack() as stack:
        align = stack.enter_context(_atomic_text(out.alignment)) if out.alignment else None
        for result in translator.stream(lines, out.window, out.nbest):
            count += 1
            if out.nbest == 1:
                text.write(result.nbest[0][0] + "\n")
            else:
                text.writelines(f"{count - 1} ||| {t} ||| {s:.4f}\n" for t, s in result.nbest)
            if count % out.window == 0:  # a window's lines leave at once (a person at a terminal, a pipe)
                text.flush()
            if align is None and out.attention_dir is None:
                continue
            parts = [attention_maps(translator.model, src, tgt) for src, tgt in result.parts]
            if align is not None:
                head = None if out.head == "all" else out.head  # a grid of heads aligns by their mean
                pairs = [hard_alignment(heads_of(maps["cross"][out.layer], head)) for maps in parts]
                # Sound over the whole line: a piece's output attends to its own source only, the pieces
                # are cut at spaces or between subwords (their subwords, in order, are the line's) and
                # the line's output is theirs in order
                lengths = [(len(src), len(tgt)) for src, tgt in result.parts]
                align.write(pharaoh(joined_alignment(pairs, lengths, len(translator.prefix))) + "\n")
            if out.attention_dir is not None and parts:
                write_attention(translator, count, result, parts, out)
    return count
