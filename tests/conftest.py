"""Shared fixtures: tiny model configs, the Multi30k location, and a corpus slice for end-to-end tests."""

from __future__ import annotations

import gzip
import os
from pathlib import Path

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


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
