"""Checkpoints: atomic save, safe (weights-only) load, keep-last-N, averaging, finding a run's model.

A checkpoint is one dict holding everything needed to translate or resume: `model` (weights),
`config` (the resolved RunConfig as a dict), `vocab` (SentencePiece model bytes), `step`, and for
resumable checkpoints `train_state` (optimizer, schedule, RNG, data position).
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

import torch

from mtkit.errors import UserError

STEP_PATTERN = re.compile(r"^step_(\d+)\.pt$")
BEST, AVERAGED = "best.pt", "averaged.pt"


def save_checkpoint(state: dict, path: str | Path) -> None:
    """Write `state` to `path` atomically: a temporary file in the same directory, fsync, rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_checkpoint(path: str | Path) -> dict:
    """Load a checkpoint without running any code from it (torch's weights-only unpickler)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: checkpoint not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated, random bytes, or a pickle that wants to run code
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"{path}: not a loadable mtkit checkpoint ({reason[:200]})") from None
    if not isinstance(state, dict) or not {"model", "config", "vocab"} <= set(state):
        raise UserError(f"{path}: not an mtkit checkpoint (missing model, config or vocab)")
    return state


def step_checkpoints(directory: str | Path) -> list[Path]:
    """A run's step checkpoints, oldest first."""
    directory = Path(directory)
    found = [(int(m.group(1)), p) for p in directory.glob("step_*.pt") if (m := STEP_PATTERN.match(p.name))]
    return [p for _, p in sorted(found)]


def prune(directory: str | Path, keep_last: int) -> None:
    """Delete all but the newest `keep_last` step checkpoints."""
    for path in step_checkpoints(directory)[:-keep_last]:
        path.unlink(missing_ok=True)


def resolve_model(path: str | Path) -> Path:
    """A checkpoint file as given; for a run directory its averaged, else best, else newest step."""
    path = Path(path)
    if path.is_file():
        return path
    if not path.is_dir():
        raise UserError(f"{path}: no such checkpoint file or run directory")
    ckpt_dir = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    for name in (AVERAGED, BEST):
        if (ckpt_dir / name).is_file():
            return ckpt_dir / name
    steps = step_checkpoints(ckpt_dir)
    if not steps:
        raise UserError(f"{path}: run directory holds no checkpoint ({AVERAGED}, {BEST} or step_*.pt)")
    return steps[-1]


def average_checkpoints(paths: list[Path]) -> dict:
    """Section 6.1: the element-wise mean of the weights of several checkpoints of one run."""
    states = [load_checkpoint(p) for p in paths]
    first = states[0]
    for p, s in zip(paths[1:], states[1:]):
        if s["model"].keys() != first["model"].keys():
            raise UserError(f"{p}: weights do not match {paths[0]} (different architectures?)")
    model = {}
    for key, value in first["model"].items():
        if value.is_floating_point():
            model[key] = sum(s["model"][key].double() for s in states).div(len(states)).to(value.dtype)
        else:
            model[key] = value
    return {"model": model, "config": first["config"], "vocab": first["vocab"],
            "step": max(s["step"] for s in states), "averaged": [str(p) for p in paths]}
