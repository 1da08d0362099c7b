"""Binary shards on disk: token ids concatenated plus offsets, memory-mapped for training."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from mtkit.data.vocab import Vocab
from mtkit.errors import UserError

MANIFEST = "manifest.json"


def write_ids(directory: Path, stem: str, ids: list[list[int]], vocab_size: int) -> None:
    """Write `stem.ids.npy` (all tokens, uint16 when they fit) and `stem.offsets.npy` (n + 1)."""
    dtype = np.uint16 if vocab_size <= np.iinfo(np.uint16).max + 1 else np.int32
    lengths = np.fromiter((len(x) for x in ids), dtype=np.int64, count=len(ids))
    offsets = np.zeros(len(ids) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    flat = np.fromiter((t for x in ids for t in x), dtype=dtype, count=int(offsets[-1]))
    np.save(directory / f"{stem}.ids.npy", flat)
    np.save(directory / f"{stem}.offsets.npy", offsets)


class TokenArray:
    """A memory-mapped ragged array: sentence i is ids[offsets[i]:offsets[i+1]]."""

    def __init__(self, directory: Path, stem: str):
        self.ids = np.load(directory / f"{stem}.ids.npy", mmap_mode="r")
        self.offsets = np.load(directory / f"{stem}.offsets.npy")
        self.lengths = np.diff(self.offsets)

    def __len__(self) -> int:
        return len(self.lengths)

    def __getitem__(self, i: int) -> np.ndarray:
        return self.ids[self.offsets[i] : self.offsets[i + 1]]


class PreparedData:
    """A directory written by `prepare`: manifest, SentencePiece models and per-split shards."""

    def __init__(self, directory: str | Path):
        self.dir = Path(directory)
        path = self.dir / MANIFEST
        if not path.is_file():
            raise UserError(f"{self.dir}: no prepared data here ({MANIFEST} missing); run `mtkit prepare` first")
        self.manifest = json.loads(path.read_text(encoding="utf-8"))
        src_model = (self.dir / self.manifest["vocab"]["src_model"]).read_bytes()
        tgt_name = self.manifest["vocab"].get("tgt_model")
        self.vocab = Vocab(src_model, (self.dir / tgt_name).read_bytes() if tgt_name else None)

    def split(self, name: str) -> tuple[TokenArray, TokenArray]:
        """(source, target) token arrays of one split."""
        if name not in self.manifest["splits"]:
            raise UserError(f"{self.dir}: split '{name}' was not prepared (have: {', '.join(self.manifest['splits'])})")
        return TokenArray(self.dir, f"{name}.src"), TokenArray(self.dir, f"{name}.tgt")

    def text(self, name: str, side: str) -> list[str]:
        """The cleaned text of a split, as written beside the shards (for validation BLEU)."""
        return (self.dir / f"{name}.{side}.txt").read_text(encoding="utf-8").split("\n")[:-1]
