"""Binary shards on disk, written incrementally by `prepare` and memory-mapped for training.

A prepared split is, per side (src, tgt): shards `{split}.{side}.{k:05d}.bin` of at most
`shard_size` pairs (token ids, uint16 when the vocabulary fits), and two per-pair index files,
`{split}.{side}.lengths.bin` (int32) and `{split}.{side}.offsets.bin` (int64, start within the
pair's shard). Sentence i is found in O(1) and batching reads only the lengths: nothing is scanned.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import BinaryIO

import numpy as np

from mtkit.data.vocab import Vocab
from mtkit.errors import UserError

MANIFEST = "manifest.json"
FORMAT = 2
"""Layout version in the manifest; 1 (no field) was one .npy file per split and side."""


def id_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits, else int32."""
    return np.dtype(np.uint16 if vocab_size <= np.iinfo(np.uint16).max + 1 else np.int32)


class _SideWriter:
    """One side of a split: its shards and its lengths and offsets index, appended to as pairs come."""

    def __init__(self, directory: Path, stem: str, dtype: np.dtype):
        self.dir, self.stem, self.dtype = directory, stem, dtype
        self.lengths = open(directory / f"{stem}.lengths.bin", "wb")  # closed in close()
        self.offsets = open(directory / f"{stem}.offsets.bin", "wb")  # closed in close()
        self.shard: BinaryIO | None = None
        self.shards: list[dict] = []
        self.tokens = self.longest = 0

    def start_shard(self) -> None:
        if self.shard:
            self.shard.close()
        name = f"{self.stem}.{len(self.shards):05d}.bin"
        self.shard = open(self.dir / name, "wb")  # closed at the next shard or in close()
        self.shards.append({"file": name, "pairs": 0, "tokens": 0})

    def write(self, ids: np.ndarray, lengths: np.ndarray) -> None:
        """Pairs that all belong to the current shard."""
        current = self.shards[-1]
        starts = current["tokens"] + np.cumsum(lengths, dtype=np.int64) - lengths
        self.offsets.write(starts.astype(np.int64).tobytes())
        self.lengths.write(lengths.astype(np.int32).tobytes())
        self.shard.write(ids.astype(self.dtype, copy=False).tobytes())
        current["pairs"] += len(lengths)
        current["tokens"] += len(ids)
        self.tokens += len(ids)
        self.longest = max(self.longest, int(lengths.max(initial=0)))

    def close(self) -> dict:
        for f in (self.lengths, self.offsets, self.shard):
            if f:
                f.close()
        return {"dtype": self.dtype.name, "lengths": f"{self.stem}.lengths.bin",
                "offsets": f"{self.stem}.offsets.bin", "shards": self.shards, "longest": self.longest}


class ShardWriter:
    """Appends a split's pairs to shards of at most `shard_size` pairs per side."""

    def __init__(self, directory: Path, split: str, shard_size: int, dtypes: tuple[np.dtype, np.dtype]):
        self.sides = [_SideWriter(directory, f"{split}.{side}", dtype)
                      for side, dtype in zip(("src", "tgt"), dtypes)]
        self.shard_size = shard_size
        self.pairs = 0

    def append(self, src_ids: np.ndarray, src_lens: np.ndarray, tgt_ids: np.ndarray,
               tgt_lens: np.ndarray) -> None:
        """Add pairs given as each side's concatenated token ids and per-pair lengths."""
        sides = [(src_ids, src_lens, np.cumsum(src_lens)), (tgt_ids, tgt_lens, np.cumsum(tgt_lens))]
        done, n = 0, len(src_lens)
        while done < n:
            if self.pairs % self.shard_size == 0:
                for writer in self.sides:
                    writer.start_shard()
            take = min(self.shard_size - self.pairs % self.shard_size, n - done)
            for writer, (ids, lens, ends) in zip(self.sides, sides):
                lo, hi = (int(ends[done - 1]) if done else 0), int(ends[done + take - 1])
                writer.write(ids[lo:hi], lens[done : done + take])
            done += take
            self.pairs += take

    def close(self) -> dict:
        """Close every file; returns the split's manifest entry (files, counts, longest sentences)."""
        src, tgt = (writer.close() for writer in self.sides)
        return {"pairs": self.pairs, "shard_size": self.shard_size, "src_tokens": self.sides[0].tokens,
                "tgt_tokens": self.sides[1].tokens, "src": src, "tgt": tgt}


def _map(path: Path, dtype: np.dtype, count: int) -> np.ndarray:
    """A read-only memory map of `count` items; a file shorter than the manifest says is an error."""
    if count == 0:
        return np.zeros(0, dtype=dtype)
    try:
        return np.memmap(path, dtype=dtype, mode="r", shape=(count,))
    except (OSError, ValueError) as exc:
        raise UserError(f"{path}: cannot map {count} items of {dtype} ({exc}); "
                        "run `mtkit prepare --force` again") from None


class TokenArray:
    """One side of a split as one ragged array over memory-mapped shards: sentence i is
    shards[i // shard_size][offsets[i] : offsets[i] + lengths[i]], found in O(1)."""

    def __init__(self, directory: Path, side: dict, pairs: int, shard_size: int):
        dtype = np.dtype(side["dtype"])
        self.lengths = _map(directory / side["lengths"], np.dtype(np.int32), pairs)
        self.offsets = _map(directory / side["offsets"], np.dtype(np.int64), pairs)
        self.shards = [_map(directory / s["file"], dtype, s["tokens"]) for s in side["shards"]]
        self.shard_size = shard_size
        self.longest = int(side["longest"])

    def __len__(self) -> int:
        return len(self.lengths)

    def __getitem__(self, i: int) -> np.ndarray:
        start = int(self.offsets[i])
        return self.shards[int(i) // self.shard_size][start : start + int(self.lengths[i])]


def sampled_pairs(pairs: int, weight: float) -> int:
    """Pairs of a corpus in each epoch at `weight`: every pair floor(weight) times, and a fixed random
    share (the fraction) once more."""
    whole, fraction = divmod(weight, 1.0)
    return int(whole) * pairs + round(fraction * pairs)


def weighted_index(corpora: list[dict]) -> np.ndarray | None:
    """Indices of the training pairs of one epoch with the corpus weights (a pair repeated as often as
    its corpus' weight says); None when every weight is 1."""
    if all(c.get("weight", 1.0) == 1.0 for c in corpora):
        return None
    parts = []
    for i, c in enumerate(corpora):
        ids = np.arange(c["start"], c["start"] + c["pairs"], dtype=np.int64)
        whole, fraction = divmod(c["weight"], 1.0)
        parts += [ids] * int(whole)
        extra = round(fraction * c["pairs"])
        if extra:  # the same share every epoch and every run: the manifest counts it
            parts.append(np.sort(np.random.default_rng(i).permutation(ids)[:extra]))
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


class Selection:
    """Some sentences of a TokenArray, in a given order (repeats allowed): a weighted training split."""

    def __init__(self, base: TokenArray, index: np.ndarray):
        self.base, self.index = base, index
        self.lengths = np.asarray(base.lengths)[index]
        self.longest = base.longest

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> np.ndarray:
        return self.base[int(self.index[i])]


class PreparedData:
    """A directory written by `prepare`: manifest, SentencePiece models and per-split shards."""

    def __init__(self, directory: str | Path):
        self.dir = Path(directory)
        path = self.dir / MANIFEST
        if not path.is_file():
            raise UserError(f"{self.dir}: no prepared data here ({MANIFEST} missing); "
                            "run `mtkit prepare` first")
        try:
            self.manifest = json.loads(path.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as exc:
            raise UserError(f"{path}: not a readable manifest ({exc}); "
                            "run `mtkit prepare --force` again") from None
        if self.manifest.get("format", 1) != FORMAT:
            raise UserError(f"{self.dir}: prepared in layout {self.manifest.get('format', 1)} by mtkit "
                            f"{self.manifest.get('mtkit_version', '?')}; this mtkit reads layout {FORMAT}: "
                            "run `mtkit prepare --force` again")
        src_model = (self.dir / self.manifest["vocab"]["src_model"]).read_bytes()
        tgt_name = self.manifest["vocab"].get("tgt_model")
        try:
            pieces = self.manifest["vocab"].get("pieces")
            id_map = json.loads((self.dir / pieces).read_text(encoding="utf-8")) if pieces else None
            self.vocab = Vocab(src_model, (self.dir / tgt_name).read_bytes() if tgt_name else None, id_map)
        except ValueError as exc:
            raise UserError(f"{self.dir}: its SentencePiece model cannot be loaded ({exc}); "
                            "run `mtkit prepare --force` again") from None

    def split(self, name: str) -> tuple[TokenArray, TokenArray]:
        """(source, target) token arrays of one split."""
        if name not in self.manifest["splits"]:
            raise UserError(f"{self.dir}: split '{name}' was not prepared "
                            f"(have: {', '.join(self.manifest['splits'])})")
        info = self.manifest["splits"][name]
        return (TokenArray(self.dir, info["src"], info["pairs"], info["shard_size"]),
                TokenArray(self.dir, info["tgt"], info["pairs"], info["shard_size"]))

    def corpora(self, name: str) -> list[dict]:
        """The corpora of a split: name, src_lang, tgt_lang, tag, start, pairs (and weight for train)."""
        info = self.manifest["splits"][name]
        if "corpora" in info:
            return info["corpora"]
        m = self.manifest
        return [{"name": f"{m['src_lang']}-{m['tgt_lang']}", "src_lang": m["src_lang"],
                 "tgt_lang": m["tgt_lang"], "tag": None, "start": 0, "pairs": info["pairs"], "weight": 1.0}]

    def training_pairs(self) -> tuple[TokenArray | Selection, TokenArray | Selection]:
        """The training split as one epoch sees it: every corpus at its weight."""
        src, tgt = self.split("train")
        index = weighted_index(self.corpora("train"))
        if index is None:
            return src, tgt
        return Selection(src, index), Selection(tgt, index)

    @property
    def fingerprint(self) -> str:
        return self.vocab.fingerprint

    def text(self, name: str, side: str) -> list[str]:
        """The cleaned text of an evaluation split, as written beside the shards (for validation BLEU)."""
        path = self.dir / f"{name}.{side}.txt"
        if not path.is_file():
            raise UserError(f"{path}: missing; prepare writes the text of evaluation splits only, "
                            "not of 'train'")
        return path.read_text(encoding="utf-8").split("\n")[:-1]
