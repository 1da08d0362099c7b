"""Shared fixtures: tiny model configs, the Multi30k location, and a corpus slice for end-to-end tests."""

from __future__ import annotations

import gzip
import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from mtkit.config import ModelConfig

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("MTKIT_TEST_DATA", ROOT.parent / "shared" / "data" / "multi30k"))


def tiny_model_config(**changes) -> ModelConfig:
    """The guide's unit-test size: d_model 16, 2 heads, 1 layer."""
    base = dict(d_model=16, n_heads=2, d_ff=32, n_layers=1, dropout=0.0, max_positions=128)
    return ModelConfig(**{**base, **changes})


@pytest.fixture(scope="session")
def multi30k() -> Path:
    """The Multi30k directory, or a skip naming where it was looked for."""
    if not (DATA / "train.de.gz").is_file():
        pytest.skip(f"Multi30k not found at {DATA} (set MTKIT_TEST_DATA to its directory)")
    return DATA


def write_slice(src_dir: Path, out_dir: Path, split: str, n: int) -> None:
    """The first n lines of a Multi30k split, de and en, as plain files in out_dir."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for lang in ("de", "en"):
        with gzip.open(src_dir / f"{split}.{lang}.gz", "rt", encoding="utf-8") as f:
            lines = [next(f) for _ in range(n)]
        (out_dir / f"{split}.{lang}").write_text("".join(lines), encoding="utf-8")


WORDS = "the a small big dog cat man woman runs sits on in red blue house street".split()


def synthetic_pairs(n: int, seed: int = 0) -> list[tuple[str, str]]:
    """Toy pairs: random word strings and their reversed upper-case 'translation'."""
    rng = np.random.default_rng(seed)
    pairs = []
    for _ in range(n):
        words = list(rng.choice(WORDS, size=int(rng.integers(2, 9))))
        pairs.append((" ".join(words), " ".join(w.upper() for w in reversed(words))))
    return pairs


def write_text_pair(tmp_path: Path, name: str, pairs: list[tuple[str, str]], gz: bool = False) -> None:
    """Pairs as NAME.xx / NAME.yy files (source and target), plain or gzipped."""
    for side, lang in ((0, "xx"), (1, "yy")):
        data = "".join(f"{p[side]}\n" for p in pairs).encode()
        path = tmp_path / f"{name}.{lang}{'.gz' if gz else ''}"
        path.write_bytes(gzip.compress(data) if gz else data)


def random_lines(n: int, seed: int = 0, longest: int = 9) -> list[str]:
    """n lines of 0 to `longest` random words (empty lines among them)."""
    rng = random.Random(seed)
    return [" ".join(rng.choices(WORDS, k=rng.randint(0, longest))) for _ in range(n)]


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run fastest on one thread (and do not slow down on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def untrained_checkpoint(work: Path, tokenizer: dict | None = None, **model) -> Path:
    """A prepared synthetic corpus in `work` and an untrained model on it, saved as work/untrained.pt
    (`tokenizer`, `model`: config keys that change the defaults here)."""
    from mtkit.checkpoint import save_checkpoint
    from mtkit.config import config_from_dict, config_to_dict
    from mtkit.data.shards import PreparedData
    from mtkit.model import Transformer
    from mtkit.prepare import prepare

    write_text_pair(work, "train", synthetic_pairs(300))
    raw = {"data": {"dir": str(work), "splits": {"train": "train.{lang}", "valid": "train.{lang}"},
                    "src_lang": "xx", "tgt_lang": "yy", "prepared_dir": str(work / "prepared")},
           "tokenizer": {"vocab_size": 320, **(tokenizer or {})},
           "model": {"d_model": 32, "n_heads": 2, "d_ff": 64, "n_layers": 2, "dropout": 0.0,
                     "max_positions": 64, **model},
           "decode": {"beam_size": 3, "max_len_offset": 6}}
    cfg = config_from_dict(raw)
    vocab = PreparedData(prepare(cfg)).vocab
    torch.manual_seed(0)
    weights = Transformer(cfg.model, vocab.src_size, vocab.tgt_size).state_dict()
    path = work / "untrained.pt"
    save_checkpoint({"model": weights, "config": config_to_dict(cfg), "vocab": vocab.to_state(),
                     "step": 0}, path)
    return path


def tagged_vocab():
    """A small joint SentencePiece model (mtkit's special ids) with the tag <BT> as a piece of its own."""
    import io

    import sentencepiece as spm

    from mtkit.data.vocab import SPECIAL_IDS, Vocab

    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(random_lines(300, seed=4)), model_writer=buffer,
                                   vocab_size=60, hard_vocab_limit=False, user_defined_symbols=["<BT>"],
                                   minloglevel=2, **SPECIAL_IDS)
    return Vocab(buffer.getvalue())
