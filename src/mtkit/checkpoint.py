"""Checkpoints: atomic save, safe (weights-only) load, keep-last-N, averaging, finding a run's model.

A checkpoint is one dict holding everything needed to translate or resume: `model` (weights),
`config` (the resolved RunConfig as a dict), `vocab` (SentencePiece model bytes), `step`, and for
resumable checkpoints `train_state` (optimizer, schedule, RNG, data position).
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import torch

from mtkit.errors import UserError
from mtkit.io import TMP_SUFFIX, atomic_file

STEP_PATTERN = re.compile(r"^step_(\d+)\.pt$")
BEST, AVERAGED = "best.pt", "averaged.pt"
MODEL_FILE = "model.pt"  # the one checkpoint of a directory made by `mtkit import`
SAVE_FAILED = "cannot write checkpoint ({cause}); the checkpoints already on disk are untouched"


def save_checkpoint(state: dict, path: str | Path) -> None:
    """Write `state` to `path` atomically (`mtkit.io.atomic_file`: temporary sibling, fsync, rename).

    A failed write (disk full, file-size limit, killed) leaves `path` as it was; the temporary
    file is removed, or, after SIGKILL, by `remove_stray_temps` at the next start.
    """
    with atomic_file(path, "wb", message=SAVE_FAILED) as f:
        writer = _Writer(f)
        try:
            torch.save(state, writer)
        except RuntimeError:  # torch's zip writer reports a failed write as RuntimeError
            if writer.error is None:
                raise
            raise writer.error from None


class _Writer:
    """A binary file for torch.save that remembers the OSError behind a failed write."""

    def __init__(self, f):
        self.f, self.error = f, None

    def write(self, data) -> int:
        try:
            return self.f.write(data)
        except OSError as exc:
            self.error = exc
            raise

    def flush(self) -> None:
        self.f.flush()


def remove_stray_temps(directory: str | Path) -> list[Path]:
    """Delete temporary files a killed save left in `directory`; returns what was removed."""
    stray = sorted(Path(directory).glob(f".*{TMP_SUFFIX}"))
    for path in stray:
        path.unlink(missing_ok=True)
    return stray


def _read(path: Path) -> dict:
    """torch's weights-only unpickler: tensors and plain data load, any other object is refused."""
    with warnings.catch_warnings():  # torch's warnings about odd bytes: the error below says it in one line
        warnings.simplefilter("ignore")
        state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or not {"model", "config", "vocab"} <= set(state):
        raise ValueError("not an mtkit checkpoint (missing model, config or vocab)")
    return state


def load_checkpoint(path: str | Path) -> dict:
    """Load a checkpoint without running any code from it; a bad file is a one-line error that
    names the newest loadable checkpoint beside it."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: checkpoint not found")
    try:
        return _read(path)
    except Exception as exc:  # truncated, empty, random bytes, or a pickle that wants to run code
        reason = _why_unloadable(exc)
        good = newest_good_checkpoint(path.parent, skip=path)
        hint = f"; newest loadable checkpoint here: {good}" if good else "; no loadable checkpoint beside it"
        raise UserError(f"{path}: not a loadable mtkit checkpoint ({reason}){hint}") from None


def _why_unloadable(exc: Exception) -> str:
    """The reason in a few words; for a refused pickle, what it wanted to run (never torch's advice
    to load it unsafely)."""
    text = str(exc).strip()
    if "Weights only load failed" in text:
        wanted = re.search(r"unsupported GLOBAL (\S+)", text)
        what = f" ({wanted.group(1)})" if wanted else ""
        return (f"it holds Python objects{what} that loading would run as code; refused by the weights-only "
                "loader, and it never ran")
    return text.splitlines()[0][:200] if text else type(exc).__name__


def newest_good_checkpoint(directory: Path, skip: Path | None = None) -> Path | None:
    """The newest step checkpoint (else best, else averaged) in `directory` that loads."""
    for candidate in [*reversed(step_checkpoints(directory)), directory / BEST, directory / AVERAGED]:
        if candidate != skip and candidate.is_file():
            try:
                _read(candidate)
                return candidate
            except Exception:  # the next one, then
                continue
    return None


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
    """A checkpoint file as given; for a run directory its averaged, else best, else newest step;
    for an imported model's directory its model.pt."""
    path = Path(path)
    if path.is_file():
        return path
    if not path.is_dir():
        raise UserError(f"{path}: no such checkpoint file or run directory")
    ckpt_dir = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    for name in (AVERAGED, BEST, MODEL_FILE):
        if (ckpt_dir / name).is_file():
            return ckpt_dir / name
    steps = step_checkpoints(ckpt_dir)
    if not steps:
        raise UserError(f"{path}: run directory holds no checkpoint ({AVERAGED}, {BEST}, {MODEL_FILE} or "
                        "step_*.pt)")
    return steps[-1]


def average_checkpoints(paths: list[Path]) -> dict:
    """Section 6.1: the element-wise mean of the weights of several checkpoints of one run."""
    states = [load_checkpoint(p) for p in paths]
    first = states[0]
    for p, s in zip(paths[1:], states[1:]):
        shapes = {k: tuple(v.shape) for k, v in s["model"].items()}
        if shapes != {k: tuple(v.shape) for k, v in first["model"].items()}:
            raise UserError(f"{p}: its weights do not have the names and shapes of {paths[0]}'s "
                            "(checkpoints of different models cannot be averaged)")
        if s["vocab"] != first["vocab"]:
            raise UserError(f"{p}: its vocabulary is not that of {paths[0]} (checkpoints of different runs)")
    model = {}
    for key, value in first["model"].items():
        if value.is_floating_point():
            model[key] = sum(s["model"][key].double() for s in states).div(len(states)).to(value.dtype)
        else:
            model[key] = value
    return {"model": model, "config": first["config"], "vocab": first["vocab"],
            "step": max(s["step"] for s in states), "averaged": [str(p) for p in paths]}
