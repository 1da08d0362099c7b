"""SentencePiece subword models: training on a bounded sample of the training split, encoding and decoding."""

from __future__ import annotations

import functools
import hashlib
import io
import os
from collections.abc import Iterable

import numpy as np
import sentencepiece as spm

from mtkit.config import TokenizerConfig
from mtkit.data.corpus import Chunk
from mtkit.errors import UserError

PAD, UNK, BOS, EOS = 0, 1, 2, 3
"""The special ids every vocabulary has, in SentencePiece's order: padding, unknown, begin and end
of sentence. The one definition: the model, batching, search and export import them from here."""
SPECIAL_IDS = {"pad_id": PAD, "unk_id": UNK, "bos_id": BOS, "eos_id": EOS}


def sample_size(cfg: TokenizerConfig) -> int | None:
    """Pairs to sample so that each SentencePiece model sees at most input_sentence_size sentences."""
    if cfg.input_sentence_size is None:
        return None
    return max(1, cfg.input_sentence_size // 2) if cfg.joint else cfg.input_sentence_size


def sample_pairs(chunks: Iterable[Chunk], size: int | None, seed: int) -> tuple[Chunk | None, int]:
    """A uniform random sample of at most `size` raw pairs from a stream of chunks, and the pairs seen.

    Vitter's algorithm R, seeded: memory is bounded by `size`, not by the corpus. While the stream
    has no more than `size` pairs the sample is all of them, in order.
    """
    rng = np.random.default_rng(seed)
    items, numbers, seen, head = [], [], 0, None
    for chunk in chunks:
        head = head or chunk
        n = len(chunk.items)
        fill = n if size is None else max(0, min(n, size - seen))
        items.extend(chunk.items[:fill])
        numbers.extend(range(chunk.number(0), chunk.number(0) + fill))
        if fill < n:  # pair t (0-based) takes a random slot j with probability size / (t + 1)
            slots = rng.integers(0, np.arange(seen + fill, seen + n) + 1)
            for i in np.flatnonzero(slots < size):
                items[slots[i]], numbers[slots[i]] = chunk.items[fill + i], chunk.number(fill + i)
        seen += n
    if head is None:
        return None, 0
    return Chunk(head.kind, head.names, items, numbers=numbers), seen


def train_sentencepiece(sentences: list[str], cfg: TokenizerConfig, symbols: Iterable[str] = ()) -> bytes:
    """Train a SentencePiece model on `sentences` (already a sample); return the serialized model.
    `symbols` (corpus tags) become user-defined pieces: each is always one piece, never split."""
    buffer = io.BytesIO()
    options = dict(
        sentence_iterator=iter(sentences), model_writer=buffer, vocab_size=cfg.vocab_size,
        model_type=cfg.type, character_coverage=cfg.character_coverage,
        byte_fallback=cfg.byte_fallback, num_threads=os.cpu_count() or 1, minloglevel=2,
        **SPECIAL_IDS,
    )
    if symbols:
        options["user_defined_symbols"] = list(symbols)
    try:
        spm.SentencePieceTrainer.train(**options)
    except RuntimeError as exc:
        message = str(exc).splitlines()[-1] if str(exc) else type(exc).__name__
        raise UserError(f"tokenizer: SentencePiece training failed: {message}") from None
    return buffer.getvalue()


def train_vocab(src: list[str], tgt: list[str], cfg: TokenizerConfig, symbols: Iterable[str] = ()) -> Vocab:
    """One joint model on both sides, or one model per side (tags on the source side)."""
    if cfg.joint:
        return Vocab(train_sentencepiece(src + tgt, cfg, symbols))
    return Vocab(train_sentencepiece(src, cfg, symbols), train_sentencepiece(tgt, cfg))


def load_processor(model: bytes) -> spm.SentencePieceProcessor:
    """A SentencePiece processor from serialized model bytes; bytes that are no SentencePiece
    model raise ValueError."""
    try:
        return spm.SentencePieceProcessor(model_proto=model)
    except (RuntimeError, TypeError, OSError) as exc:
        raise ValueError(f"not a SentencePiece model ({str(exc).strip()[:120]})") from None


SPECIAL_NAMES = ("<pad>", "<unk>", "<s>", "</s>")
"""How a special the SentencePiece model lacks (many have no pad or bos piece) is shown."""


class Subwords:
    """One SentencePiece model seen through mtkit's ids: PAD, UNK, BOS, EOS are 0-3 whatever ids the
    model gives them (or lacks), its other pieces follow in their order. A model made by mtkit has
    those ids already, and its ids pass through unchanged.

    With `pieces` (mtkit id -> piece, the first four the specials) the ids are that list's instead:
    an id map shared by two SentencePiece models, as Marian's vocab.json is. A piece of the model
    that the list lacks is UNK, as in Marian."""

    def __init__(self, model: bytes, pieces: list[str] | None = None):
        self.model = model
        self.sp = load_processor(model)
        own = [self.sp.pad_id(), self.sp.unk_id(), self.sp.bos_id(), self.sp.eos_id()]  # -1: absent
        n = self.sp.get_piece_size()
        self.listed = list(pieces) if pieces is not None else None
        if pieces is not None:
            index = {p: i for i, p in enumerate(pieces)}
            own_pieces = [self.sp.id_to_piece(i) for i in range(n)]
            theirs = {p: i for i, p in enumerate(own_pieces)}
            self.from_spm = np.array([index.get(p, UNK) for p in own_pieces], dtype=np.int64)
            for ours, i in enumerate(own):
                if i >= 0:
                    self.from_spm[i] = ours
            # a listed piece the model lacks decodes as its unknown piece, as decode_pieces would
            self.to_spm = np.array([theirs.get(p, self.sp.unk_id()) for p in pieces], dtype=np.int64)
            self.to_spm[[PAD, BOS, EOS]] = -1  # not text
            self.to_spm[UNK] = self.sp.unk_id()
            self.size = len(pieces)
            return
        if own == [PAD, UNK, BOS, EOS]:
            self.to_spm = self.from_spm = None
            self.size = n
            return
        specials = {i for i in own if i >= 0}
        others = [i for i in range(n) if i not in specials]
        self.to_spm = np.array(own + others, dtype=np.int64)  # mtkit id -> SentencePiece id (-1: none)
        self.from_spm = np.empty(n, dtype=np.int64)  # SentencePiece id -> mtkit id
        self.from_spm[others] = np.arange(4, 4 + len(others))
        for ours, theirs in enumerate(own):
            if theirs >= 0:
                self.from_spm[theirs] = ours
        self.size = 4 + len(others)

    @property
    def mapped(self) -> bool:
        """True when the model's special ids are not mtkit's (its ids are translated)."""
        return self.to_spm is not None

    def encode(self, lines: list[str], num_threads: int | None = None) -> list[list[int]]:
        ids = self.sp.encode(lines, num_threads=num_threads)
        if self.from_spm is None:
            return ids
        return [self.from_spm[x].tolist() if x else [] for x in ids]

    def encode_sampled(self, lines: list[str], alpha: float) -> list[list[int]]:
        """A random segmentation of each line, drawn by SentencePiece (BPE-dropout or unigram
        sampling with `alpha`) from its random generator (`sentencepiece.set_random_generator_seed`)."""
        ids = self.sp.encode(lines, enable_sampling=True, alpha=alpha, nbest_size=-1, num_threads=1)
        if self.from_spm is None:
            return ids
        return [self.from_spm[x].tolist() if x else [] for x in ids]

    def _theirs(self, ids: Iterable[int]) -> list[int]:
        if self.to_spm is None:
            return list(ids)
        return [t for t in (int(self.to_spm[i]) for i in ids) if t >= 0]

    def decode(self, ids: list[int]) -> str:
        """One sentence's text; specials are not text."""
        if self.listed is not None:
            return self._decode_listed(ids)
        return self.sp.decode(self._theirs(ids))

    def decode_many(self, ids: list[list[int]]) -> list[str]:
        if self.listed is not None:
            return [self._decode_listed(x) for x in ids]
        return self.sp.decode([self._theirs(x) for x in ids])

    def _decode_listed(self, ids: list[int]) -> str:
        """As Marian's tokenizer decodes: the pieces' text (a piece the model lacks, such as one of
        the other side's, verbatim), the specials (<unk> too) left out."""
        text = self.sp.decode_pieces([self.listed[i] for i in ids if i > EOS])
        return text.replace("\u2581", " ").strip()

    def id_to_piece(self, i: int) -> str:
        if self.listed is not None:
            return self.listed[i]
        if self.to_spm is None:
            return self.sp.id_to_piece(int(i))
        theirs = int(self.to_spm[i])
        return self.sp.id_to_piece(theirs) if theirs >= 0 else SPECIAL_NAMES[i]

    def piece_to_id(self, piece: str) -> int | None:
        """mtkit's id of a piece; None when the vocabulary lacks it."""
        if self.listed is not None:
            return self._index.get(piece)
        theirs = self.sp.piece_to_id(piece)
        if self.sp.is_unknown(theirs) and piece != self.sp.id_to_piece(theirs):
            return None
        return theirs if self.from_spm is None else int(self.from_spm[theirs])

    @functools.cached_property
    def _index(self) -> dict[str, int]:
        return {p: i for i, p in enumerate(self.listed or [])}

    @property
    def pieces(self) -> list[str]:
        """Every piece by mtkit id."""
        return [self.id_to_piece(i) for i in range(self.size)]


def check_pieces(pieces: object, source: str) -> list[str]:
    """An id map (mtkit id -> piece): a list of distinct strings whose first four are the specials
    (any names); anything else is a UserError naming `source`."""
    if not isinstance(pieces, list) or len(pieces) < 5 or not all(isinstance(p, str) for p in pieces):
        raise UserError(f"{source}: an id map is a list of at least 5 pieces (strings), the first four "
                        "the specials <pad>, <unk>, <s>, </s>")
    if len(set(pieces)) < len(pieces):
        twice = sorted({p for p in pieces if pieces.count(p) > 1})
        raise UserError(f"{source}: pieces {twice[:3]} occur twice in the id map")
    return pieces


def marian_pieces(vocab: dict, source: str, specials: dict[str, str] | None = None) -> list[str]:
    """Marian's vocab.json ({piece: id}) as mtkit's id map: PAD, UNK, BOS, EOS first (named by
    `specials`: role -> piece; Marian has no BOS, mtkit's is "<s>"), then every other piece in
    Marian's id order. Duplicate ids or a missing <unk> / </s> are a UserError naming `source`."""
    names = {**dict(zip(("pad", "unk", "bos", "eos"), SPECIAL_NAMES)), **(specials or {})}
    if not isinstance(vocab, dict) or not all(type(v) is int for v in vocab.values()):
        raise UserError(f"{source}: not a vocabulary ({{piece: id}} JSON object)")
    if len(set(vocab.values())) < len(vocab):
        raise UserError(f"{source}: several pieces share one id")
    for role in ("unk", "eos"):
        if names[role] not in vocab:
            raise UserError(f"{source}: no {names[role]!r} piece ({role})")
    first = [names[r] for r in ("pad", "unk", "bos", "eos")]
    rest = [p for p, _ in sorted(vocab.items(), key=lambda kv: kv[1]) if p not in first]
    return check_pieces(first + rest, source)


class Vocab:
    """Source and target subword models (the same one when the vocabulary is joint), with ids of
    their own or, with `pieces`, one id map both sides share (see Subwords)."""

    def __init__(self, src_model: bytes, tgt_model: bytes | None = None, pieces: list[str] | None = None):
        self.src_model, self.tgt_model = src_model, tgt_model or src_model
        self.id_map = pieces
        self.src = Subwords(self.src_model, pieces)
        self.tgt = self.src if tgt_model is None else Subwords(self.tgt_model, pieces)

    @property
    def joint(self) -> bool:
        """One SentencePiece model for both sides."""
        return self.tgt is self.src

    @property
    def shared_ids(self) -> bool:
        """Both sides have the same ids (one model, or one id map): embeddings may be shared."""
        return self.joint or self.id_map is not None

    @property
    def src_size(self) -> int:
        return self.src.size

    @property
    def tgt_size(self) -> int:
        return self.tgt.size

    def encode_src(self, lines: list[str], num_threads: int | None = None) -> list[list[int]]:
        return self.src.encode(lines, num_threads)

    def encode_tgt(self, lines: list[str], num_threads: int | None = None) -> list[list[int]]:
        return self.tgt.encode(lines, num_threads)

    def decode_tgt(self, ids: list[list[int]]) -> list[str]:
        return self.tgt.decode_many(ids)

    def src_pieces_of(self, ids: list[int]) -> list[str]:
        return [self.src.id_to_piece(i) for i in ids]

    def tgt_pieces_of(self, ids: list[int]) -> list[str]:
        return [self.tgt.id_to_piece(i) for i in ids]

    def tag_id(self, tag: str) -> int:
        """The source id of a tag (a piece of its own, e.g. <2en> or <BT>) to put in front of a
        sentence; a tag the vocabulary lacks is an error naming it."""
        i = self.src.piece_to_id(tag)
        if i is None or i < 4:
            raise UserError(f"tag {tag!r} is not a piece of this vocabulary: a tag is one piece, made when "
                            "prepare trains the SentencePiece model of corpora tagged with it "
                            "(data.corpora[].tag), or a user-defined symbol of a model you bring")
        return i

    @property
    def fingerprint(self) -> str:
        """A short hash of the SentencePiece model(s): equal fingerprints, equal token ids."""
        digest = hashlib.sha256(self.src_model)
        if not self.joint:
            digest.update(b"\0" + self.tgt_model)
        if self.id_map is not None:
            digest.update(b"\0" + "\n".join(self.id_map).encode("utf-8"))
        return digest.hexdigest()[:16]

    def to_state(self) -> dict:
        """Serializable form stored in the prepared directory's manifest and in checkpoints."""
        state = {"src": self.src_model, "tgt": None if self.joint else self.tgt_model}
        if self.id_map is not None:
            state["pieces"] = list(self.id_map)
        return state

    @classmethod
    def from_state(cls, state: dict) -> Vocab:
        return cls(state["src"], state.get("tgt"), state.get("pieces"))
