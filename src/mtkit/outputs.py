"""Where `mtkit translate` writes: translations (stdout or a file written whole), n-best lists,
and per line attention pictures and hard alignments."""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from mtkit.io import atomic_file
from mtkit.translate import Translator

log = logging.getLogger("mtkit")


@dataclass
class Outputs:
    """Where `translate_to` writes: translations (stdout when None), n-best size, the streaming
    window, and optional attention pictures and hard alignments."""

    output: Path | None = None
    nbest: int = 1
    window: int = 1000
    attention_dir: Path | None = None
    alignment: Path | None = None
    layer: int = -1
    head: int | None = None


@contextmanager
def _atomic_text(path: Path | None) -> Iterator[TextIO]:
    """stdout as is; a file written whole or not at all (`mtkit.io.atomic_file`)."""
    if path is None or str(path) == "-":
        yield sys.stdout
        sys.stdout.flush()
        return
    with atomic_file(path) as f:
        yield f


def translate_to(translator: Translator, lines: Iterable[str], out: Outputs) -> int:
    """Stream `lines` through the translator into `out`, window by window; returns the line count."""
    from mtkit.attention import hard_alignment, pharaoh, save_heatmap

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
            if len(result.src_ids) > translator.source_limit:  # translated in pieces: no one picture
                log.warning("line %d: translated in pieces; no attention picture or alignment", count)
                if align is not None:
                    align.write("\n")
                continue
            weights = translator.cross_attention(result.src_ids, result.tgt_ids, out.layer, out.head)
            if align is not None:
                align.write(pharaoh(hard_alignment(weights)) + "\n")
            if out.attention_dir is not None and result.src_ids:
                save_heatmap(weights, translator.vocab.src_pieces_of(result.src_ids),
                             translator.vocab.tgt_pieces_of(result.tgt_ids),
                             out.attention_dir / f"{count:06d}.png", f"line {count}: {result.nbest[0][0]}")
    return count
