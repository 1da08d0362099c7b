"""`mtkit train`: token-budget batches -> Transformer -> label-smoothed loss -> Adam, with the
paper's schedule, periodic validation (loss and beam-search BLEU), checkpoints and resume.

Runs alone or as every rank of `torchrun --nproc_per_node N -m mtkit train CONFIG` (DDP): each
rank reads its own batches of a step, rank 0 validates and writes checkpoints and logs.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import shutil
import sys
import time
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from itertools import tee
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from mtkit import inference
from mtkit.checkpoint import (
    BEST,
    load_checkpoint,
    prune,
    remove_stray_temps,
    resolve_model,
    save_checkpoint,
    step_checkpoints,
)
from mtkit.config import ModelConfig, RunConfig, config_to_dict, parse_duration, save_config
from mtkit.curves import plot_curves
from mtkit.data.batching import Drawn, Resegmenter, collate, rank_batches, step_groups, token_batches
from mtkit.data.shards import PreparedData, Selection, TokenArray
from mtkit.data.vocab import PAD, Vocab
from mtkit.device import Precision, choose_precision, describe, versions
from mtkit.engine import (
    ComputeContext,
    Dist,
    init_distributed,
    label_smoothed_loss,
    make_optimizer,
    probe_max_tokens,
    train_step,
    wrap_model,
)
from mtkit.errors import UserError
from mtkit.evaluate import score
from mtkit.io import exclusive, write_text
from mtkit.model import Transformer, count_parameters
from mtkit.prepare import given_vocab
from mtkit.translate import Translator

log = logging.getLogger("mtkit")

# Keys that may change between a run and its resumption without changing what is trained.
RESUMABLE_CHANGES = ("train.run_dir", "train.max_steps", "train.max_epochs", "train.max_time",
                     "train.valid_every", "train.log_every", "train.keep_last", "train.patience",
                     "train.device", "train.threads", "train.valid_bleu_sentences", "train.compile",
                     "decode.", "data.num_proc", "data.shard_size", "train.init_from")
MAX_BAD_STEPS = 10
STARTS = "starts.jsonl"  # one line per invocation: versions, hardware, precision
LOCK = ".lock"  # held by the training process (its pid inside) while it runs


def learning_rate(step: int, d_model: int, warmup: int, factor: float = 1.0, decay: str = "inverse_sqrt",
                  max_steps: int | None = None) -> float:
    """Section 5.3: lrate = d_model^-0.5 * min(step^-0.5, step * warmup^-1.5), times `factor`.
    decay "linear" keeps the warm-up and its peak, then falls in a straight line to 0 at `max_steps`."""
    step = max(step, 1)
    if decay == "linear" and step > warmup:  # the peak is the paper's rate at the end of warm-up
        peak = learning_rate(warmup, d_model, warmup, factor)
        return peak * max(max_steps - step, 0) / (max_steps - warmup)
    return factor * d_model**-0.5 * min(step**-0.5, step * warmup**-1.5)


@dataclass
class TrainState:
    """Where a run is: everything beyond the weights and optimizer that resume must restore."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    best_bleu: float | None = None
    bad_validations: int = 0
    max_tokens: int | None = None
    history: list = field(default_factory=list)
    elapsed: float = 0.0  # seconds of training up to this state, over every invocation
    init_from: dict | None = None  # the model a fine-tuning run started from: path, step, fingerprint


class Clock:
    """Wall-clock time of this invocation (what train.max_time bounds) and of the whole run."""

    def __init__(self, before: float = 0.0):
        self.start, self.before = time.monotonic(), before

    def this_run(self) -> float:
        return time.monotonic() - self.start

    def total(self) -> float:
        return self.before + self.this_run()

    def stamp(self) -> dict:
        """What every log record carries: the time of day (UTC, ISO 8601) and the run's elapsed seconds."""
        return {"time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "elapsed": round(self.total(), 1)}


@dataclass
class Run:
    """What the loop works with, built once by `train`."""

    cfg: RunConfig
    model: Transformer
    step_model: torch.nn.Module  # model, or its DDP / compiled wrapper
    optimizer: torch.optim.Optimizer
    translator: Translator
    data: PreparedData
    run_dir: Path
    autocast: ComputeContext
    ranks: Dist
    device: torch.device
    clock: Clock


def _config_changes(old: dict, new: dict, prefix: str = "") -> list[str]:
    keys = []
    for key in sorted(set(old) | set(new)):
        full = f"{prefix}{key}"
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict) and key != "splits":
            keys += _config_changes(a, b, f"{full}.")
        elif a != b and not full.startswith(RESUMABLE_CHANGES):
            keys.append(full)
    return keys


class _Pairs(Dataset):
    def __init__(self, src: TokenArray | Selection | Drawn, tgt: TokenArray | Selection | Drawn):
        self.src, self.tgt = src, tgt

    def __len__(self) -> int:
        return len(self.src)

    def __getitem__(self, i: int) -> tuple:
        return self.src[i], self.tgt[i]


def _collate_pairs(items: list) -> dict[str, torch.Tensor]:
    return collate([s for s, _ in items], [t for _, t in items])


def _loader(src: TokenArray | Drawn, tgt: TokenArray | Drawn, batches: Iterator[np.ndarray],
            device: torch.device) -> DataLoader:
    """This rank's batches, collated ahead of use in worker processes into pinned memory on CUDA.

    Its own generator: starting a loader must not draw from the global RNG that dropout uses,
    or a resumed run would see other dropout masks than the uninterrupted one.
    """
    cuda = device.type == "cuda"
    return DataLoader(_Pairs(src, tgt), batch_sampler=batches,
                      collate_fn=_collate_pairs, num_workers=2 if cuda else 0, pin_memory=cuda,
                      prefetch_factor=8 if cuda else None, generator=torch.Generator().manual_seed(0))


def _to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def _valid_loss(model: Transformer, src: TokenArray, tgt: TokenArray, lo: int, hi: int,
                autocast: ComputeContext, max_tokens: int, device: torch.device) -> tuple[float, int]:
    """Summed target-token NLL (no smoothing) of the validation pairs lo..hi, and their token count."""
    nll_sum, tokens = 0.0, 0
    for idx in token_batches(src.lengths[lo:hi], tgt.lengths[lo:hi], max_tokens):
        batch = _to_device(collate([src[lo + i] for i in idx], [tgt[lo + i] for i in idx]), device)
        with autocast:
            logits = model(batch["src"], batch["tgt_in"])
        nll_sum += label_smoothed_loss(logits, batch["tgt_out"], 0.0)[1].item()
        tokens += int((batch["tgt_out"] != PAD).sum())
    return nll_sum, tokens


def _perplexity(nll: float) -> float:
    return math.exp(min(nll, 50))


@torch.no_grad()
def validate(model: Transformer, translator: Translator, data: PreparedData, cfg: RunConfig,
             autocast: ComputeContext, max_tokens: int) -> dict:
    """Validation loss (per target token, the training model as it is) and sacreBLEU of beam
    search (BLEU tokenized for the target language; on CPU with a copy installed with the CPU
    backend: same outputs, faster), for each corpus with a validation split (a direction: its tag
    in front of its sources). With several, `directions` holds each one's figures, valid_loss is
    over all their tokens and valid_bleu the mean of their BLEU."""
    model.eval()
    src, tgt = data.split("valid")
    src_text, refs = data.text("valid", "src"), data.text("valid", "tgt")
    if translator.device.type == "cpu":
        decoder = copy.deepcopy(model)
        backend = inference.install(decoder, translator.device)
    else:
        decoder, backend = translator.model, translator.backend
    directions, nll_all, tokens_all = {}, 0.0, 0
    for c in (c for c in data.corpora("valid") if c["pairs"]):
        lo, hi = c["start"], c["start"] + c["pairs"]
        nll_sum, tokens = _valid_loss(model, src, tgt, lo, hi, autocast, max_tokens, translator.device)
        nll_all, tokens_all = nll_all + nll_sum, tokens_all + tokens
        n = min(c["pairs"], cfg.train.valid_bleu_sentences or c["pairs"])
        decode = replace(translator.decode, prefix=c["tag"], sample=False)  # beam search always
        search = Translator(decoder, translator.vocab, decode, translator.device,
                            precision=translator.precision, backend=backend)
        hyps = search.translate(src_text[lo : lo + n])
        bleu = score(hyps, [refs[lo : lo + n]], metrics=("bleu",), lang=c["tgt_lang"])["bleu"]
        loss = nll_sum / max(tokens, 1)
        directions[c["name"]] = {"valid_loss": loss, "valid_ppl": _perplexity(loss), "valid_bleu": bleu}
    model.train()
    loss = nll_all / max(tokens_all, 1)
    record = {"valid_loss": loss, "valid_ppl": _perplexity(loss),
              "valid_bleu": sum(d["valid_bleu"] for d in directions.values()) / len(directions)}
    if len(directions) > 1:
        record["directions"] = directions
    return record


def _checkpoint(run: Run, state: TrainState, with_train_state: bool = True) -> dict:
    ckpt = {"model": run.model.state_dict(), "config": config_to_dict(run.cfg),
            "vocab": run.data.vocab.to_state(), "vocab_fingerprint": run.data.fingerprint, "step": state.step}
    if state.init_from:
        ckpt["init_from"] = state.init_from
    if with_train_state:
        ckpt["train_state"] = {
            "optimizer": run.optimizer.state_dict(), "epoch": state.epoch,
            "batch_in_epoch": state.batch_in_epoch, "best_bleu": state.best_bleu,
            "bad_validations": state.bad_validations, "max_tokens": state.max_tokens,
            "history": state.history, "torch_rng": torch.get_rng_state(), "elapsed": state.elapsed,
            "init_from": state.init_from,
        }
        if run.autocast.scaler is not None:
            ckpt["train_state"]["grad_scaler"] = run.autocast.scaler.state_dict()
    return ckpt


def _setup_run_dir(cfg: RunConfig, resume: bool, force: bool) -> Path:
    run_dir = Path(cfg.train.run_dir)
    ckpt_dir = run_dir / "checkpoints"
    if not resume and step_checkpoints(ckpt_dir):
        if not force:
            raise UserError(f"{run_dir}: holds checkpoints of an earlier run; pass --resume to continue it "
                            "or --force to start over")
        shutil.rmtree(ckpt_dir)
        (run_dir / "log.jsonl").unlink(missing_ok=True)
        (run_dir / STARTS).unlink(missing_ok=True)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    for stray in remove_stray_temps(ckpt_dir):  # left by a save that was killed half-way
        log.warning("removed %s, left by an interrupted checkpoint save", stray)
    return run_dir


def _same_vocabulary(path: Path, ckpt: dict, vocab: Vocab, prepared_dir: str) -> None:
    """Refuse (whatever --force says) to go on with data whose token ids mean other pieces."""
    theirs = Vocab.from_state(ckpt["vocab"]).fingerprint
    if theirs != vocab.fingerprint:
        raise UserError(f"{path}: its vocabulary (fingerprint {theirs}) is not that of {prepared_dir} "
                        f"({vocab.fingerprint}): the data was prepared again with another SentencePiece "
                        "model, so every token id would mean another piece; start a new run "
                        "(another train.run_dir)")


def _restore(model, optimizer, autocast: ComputeContext, cfg: RunConfig, run_dir: Path, force: bool,
             main: bool, vocab: Vocab) -> TrainState:
    """Load the newest step checkpoint of `run_dir` into model and optimizer."""
    steps = step_checkpoints(run_dir / "checkpoints")
    if not steps:
        raise UserError(f"{run_dir}: nothing to resume (no checkpoints/step_*.pt)")
    ckpt = load_checkpoint(steps[-1])
    _same_vocabulary(steps[-1], ckpt, vocab, cfg.data.prepared_dir)
    changed = _config_changes(ckpt["config"], config_to_dict(cfg))
    if changed and not force:
        raise UserError(f"{steps[-1]}: config differs from the run being resumed in {', '.join(changed)}; "
                        "pass --force to resume anyway")
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as exc:  # --force past a change of architecture
        raise UserError(f"{steps[-1]}: its weights do not fit the model of this config "
                        f"({str(exc).splitlines()[-1].strip()[:160]})") from None
    ts = ckpt["train_state"]
    optimizer.load_state_dict(ts["optimizer"])
    torch.set_rng_state(ts["torch_rng"])
    if autocast.scaler is not None and "grad_scaler" in ts:
        autocast.scaler.load_state_dict(ts["grad_scaler"])
    state = TrainState(ckpt["step"], ts["epoch"], ts["batch_in_epoch"], ts["best_bleu"],
                       ts["bad_validations"], ts.get("max_tokens"), ts["history"], ts.get("elapsed", 0.0),
                       ts.get("init_from"))
    log_path = run_dir / "log.jsonl"
    if main and log_path.exists():  # forget what was logged after the checkpoint: those steps run again
        kept = [line for line in log_path.read_text().splitlines() if _logged_step(line) <= state.step]
        write_text(log_path, "".join(f"{line}\n" for line in kept))
    if main:
        _repair_best(run_dir / "checkpoints", state)
    log.info("resumed from %s at step %d (epoch %d)", steps[-1], state.step, state.epoch + 1)
    return state


def _best_step(history: list[dict]) -> int | None:
    """The step whose validation earned best.pt: the first of the highest BLEU."""
    best = None
    for record in history:
        if best is None or record["valid_bleu"] > best["valid_bleu"]:
            best = record
    return None if best is None else best["step"]


def _repair_best(ckpt_dir: Path, state: TrainState) -> None:
    """best.pt from the run's own record: a run killed while writing it (after the step checkpoint
    that earned it) would otherwise keep an older, worse model under that name for good."""
    step = _best_step(state.history)
    if step is None:
        return
    best = ckpt_dir / BEST
    try:
        current = load_checkpoint(best)["step"] if best.is_file() else None
    except UserError:
        current = None
    if current == step:
        return
    source = ckpt_dir / f"step_{step:08d}.pt"
    if not source.is_file():
        log.warning("%s is not the model of step %d, the best validation, and that checkpoint is gone",
                    best, step)
        return
    ckpt = load_checkpoint(source)
    ckpt.pop("train_state", None)
    save_checkpoint(ckpt, best)
    log.warning("rewrote %s from %s, the best validation (it was %s)", best, source.name,
                "missing" if current is None else f"step {current}")


def _logged_step(line: str) -> float:
    """The step of a log line; a line cut short by a kill counts as after any checkpoint."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return math.inf


def _barrier(ranks: Dist) -> None:
    if ranks.world > 1:
        dist.barrier()


def _broadcast(value, ranks: Dist):
    """Rank 0's value on every rank."""
    if ranks.world == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def train(cfg: RunConfig, resume: bool = False, force: bool = False) -> Path:
    """Train until max_steps, max_epochs, max_time or early stopping; returns the run directory.

    Rank 0 holds the run directory's lock throughout: a second `mtkit train` on it is refused.
    """
    clock = Clock()  # train.max_time counts from here: loading and validation are part of the budget
    t = cfg.train
    if t.threads:
        torch.set_num_threads(t.threads)
    data = PreparedData(cfg.data.prepared_dir)
    _check_data(cfg, data)
    if t.device == "cuda" and not torch.cuda.is_available():
        raise UserError("train.device: cuda requested but no CUDA device is available")
    ranks, device = init_distributed(t.device)
    if not ranks.main:
        log.setLevel(logging.WARNING)
    run_dir = Path(t.run_dir)
    try:
        with exclusive(run_dir / LOCK, str(run_dir)) if ranks.main else nullcontext():
            _train(cfg, data, ranks, device, clock, resume, force)
    finally:
        if ranks.world > 1:
            dist.destroy_process_group()
    return run_dir


def _check_data(cfg: RunConfig, data: PreparedData) -> None:
    """What the run will need of the prepared data, checked before any work."""
    given = given_vocab(cfg.tokenizer)
    if given is not None and given[0].fingerprint != data.fingerprint:
        raise UserError(f"{data.dir}: prepared with the vocabulary {data.fingerprint}, but the config's "
                        f"tokenizer ({given[1]}) is {given[0].fingerprint}: run mtkit prepare again")
    if cfg.model.share_embeddings and not data.vocab.shared_ids:
        raise UserError(f"{data.dir}: model.share_embeddings needs one id map for both sides, but its "
                        "vocabulary has two (set model.share_embeddings: false)")
    src, _ = data.split("valid")
    if len(src) == 0:
        raise UserError(f"{data.dir}: the validation split is empty (data.splits.valid); "
                        "validation needs sentences")
    longest = max(a.longest for split in ("train", "valid") for a in data.split(split)) + 1  # + EOS / BOS
    if longest > cfg.model.max_positions:
        raise UserError(f"model.max_positions ({cfg.model.max_positions}) is shorter than the longest "
                        f"sentence in {data.dir} ({longest} positions); raise it, or lower "
                        "data.max_tokens_per_sentence and prepare again")


def _train(cfg: RunConfig, data: PreparedData, ranks: Dist, device: torch.device, clock: Clock, resume: bool,
           force: bool) -> None:
    t = cfg.train
    precision = choose_precision(t.precision, device)
    log.info("precision %s (%s)", precision.name, precision.reason)
    autocast = ComputeContext(device, precision)
    run_dir = Path(t.run_dir)
    if ranks.main:
        _setup_run_dir(cfg, resume, force)
    _barrier(ranks)
    torch.manual_seed(t.seed)
    model = Transformer(cfg.model, data.vocab.src_size, data.vocab.tgt_size).to(device)
    optimizer = make_optimizer(model, t)
    state = (_restore(model, optimizer, autocast, cfg, run_dir, force, ranks.main, data.vocab) if resume
             else TrainState())
    if t.init_from and not resume:
        state.init_from = _init_weights(model, cfg, data)
    clock.before = state.elapsed
    if state.max_tokens is None:  # resolved once per run, so resume rebuilds the same batches
        longest = max(a.longest for a in data.split("train")) + 1  # from the manifest: no scan
        state.max_tokens = (probe_max_tokens(model, device, longest, autocast, data.vocab.src_size)
                            if t.max_tokens == "auto" else t.max_tokens)
        state.max_tokens = _broadcast(state.max_tokens, ranks)
    if ranks.rank:  # each rank its own dropout masks
        torch.manual_seed(t.seed * 1000 + ranks.rank + state.step)
    if ranks.main:
        save_config(cfg, run_dir / "config.yaml")
        _record_start(run_dir, device, precision, resume, state, ranks, clock)
    log.info("model: %s parameters; device %s; %d tokens per batch x %d accumulated x %d ranks",
             f"{count_parameters(model):,}", describe(device), state.max_tokens, t.accum_steps, ranks.world)
    run = Run(cfg, model, wrap_model(model, t, device, ranks), optimizer,
              Translator(model, data.vocab, cfg.decode, device, precision=precision), data, run_dir, autocast,
              ranks, device, clock)
    _loop(run, state)


STRUCTURE = ("d_model", "n_heads", "d_ff", "n_layers", "norm", "share_embeddings", "activation",
             "output_bias")
"""Model keys that must agree for one model's weights to start another run (dropout and
max_positions may differ: they hold no weights; the activation is the function they were made for)."""


def _init_weights(model: Transformer, cfg: RunConfig, data: PreparedData) -> dict:
    """Fine-tuning: the weights of train.init_from, nothing else (optimizer, schedule and step start
    afresh); its model dimensions and vocabulary must be this run's."""
    path = resolve_model(cfg.train.init_from)
    ckpt = load_checkpoint(path)
    # a key the checkpoint's config lacks (written before the key existed) has its default
    defaults = dataclasses.asdict(ModelConfig())
    theirs = {**defaults, **ckpt["config"].get("model", {})}
    ours = config_to_dict(cfg)["model"]
    differ = [f"model.{k} ({theirs.get(k)!r} there, {ours[k]!r} here)" for k in STRUCTURE
              if theirs.get(k) != ours[k]]
    if differ:
        raise UserError(f"{path}: train.init_from has other model dimensions than this config: "
                        f"{'; '.join(differ)}")
    fingerprint = Vocab.from_state(ckpt["vocab"]).fingerprint
    if fingerprint != data.fingerprint:
        raise UserError(f"{path}: train.init_from's vocabulary (fingerprint {fingerprint}) is not that of "
                        f"{data.dir} ({data.fingerprint}); prepare with tokenizer.from_model: {path}")
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as exc:
        raise UserError(f"{path}: its weights do not fit the model of this config "
                        f"({str(exc).splitlines()[-1].strip()[:160]})") from None
    log.info("initialised from %s (step %d, vocabulary %s): fresh optimizer, schedule and step counter",
             path, ckpt["step"], fingerprint)
    return {"path": str(path), "step": ckpt["step"], "fingerprint": fingerprint}


def _record_start(run_dir: Path, device: torch.device, precision: Precision, resume: bool, state: TrainState,
                  ranks: Dist, clock: Clock) -> None:
    """One line per invocation in RUN_DIR/starts.jsonl: versions, hardware and the precision chosen."""
    record = {**clock.stamp(), "step": state.step, "resumed": resume, "init_from": state.init_from,
              "hardware": describe(device),
              "precision": precision.name, "precision_reason": precision.reason,
              "threads": torch.get_num_threads(), "ranks": ranks.world, "versions": versions()}
    with open(run_dir / STARTS, "a" if resume else "w", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


class _Window:
    """Training metrics between two log records: device sums (no sync per step) and host counts."""

    def __init__(self, device: torch.device):
        self.device = device
        self.reset()

    def reset(self) -> None:
        self.sums = torch.zeros(2, device=self.device)  # this rank's loss and nll of kept steps
        self.kept = torch.zeros(2, device=self.device)  # all ranks' tokens of kept steps, skipped steps
        self.tgt_tokens = self.src_tokens = self.padded = self.steps = 0
        self.start = time.time()

    def add(self, out: dict, group: list[np.ndarray], src: TokenArray, tgt: TokenArray,
            n_tokens: int) -> None:
        kept = 1.0 - out["skipped"]  # the same on every rank: the gradient norm is global
        self.sums += torch.stack([out["loss"], out["nll"]]) * kept
        self.kept += torch.stack([n_tokens * kept, out["skipped"]])
        self.tgt_tokens += n_tokens
        self.steps += 1
        for idx in group:
            s, t = src.lengths[idx] + 1, tgt.lengths[idx] + 1
            self.src_tokens += int(s.sum())
            self.padded += len(idx) * int(s.max() + t.max())

    def record(self, state: TrainState, lr: float, ranks: Dist) -> dict:
        """Reduce over ranks (one sync per log interval) into a log record."""
        sums = self.sums.clone()
        if ranks.world > 1:
            dist.all_reduce(sums)
        (loss, nll), (tokens, skipped) = sums.tolist(), self.kept.tolist()
        elapsed = max(time.time() - self.start, 1e-9)
        real = self.tgt_tokens + self.src_tokens
        return {"step": state.step, "epoch": state.epoch + 1, "loss": loss / max(tokens, 1),
                "nll": nll / max(tokens, 1), "lr": lr, "tgt_tokens_per_s": self.tgt_tokens / elapsed,
                "tokens_per_s": real / elapsed, "padding": 1 - real / max(self.padded, 1),
                "skipped_steps": int(skipped), "steps_per_s": self.steps / elapsed}


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class _Progress:
    """Progress on stderr: a tqdm bar at a terminal; elsewhere (nohup, Slurm, CI, a pipe) one log line
    per log record with step, loss, lr, tokens/s, elapsed time and ETA; nothing under -q."""

    def __init__(self, run: Run, state: TrainState):
        self.run, self.cfg = run, run.cfg.train
        shown = run.ranks.main and log.isEnabledFor(logging.INFO)
        self.bar = tqdm(total=self.cfg.max_steps, initial=state.step, desc="train", unit="step",
                        dynamic_ncols=True, disable=not (shown and sys.stderr.isatty()))

    def step(self) -> None:
        self.bar.update(1)

    def eta(self, state: TrainState, steps_per_s: float) -> float:
        """Seconds to the nearer of max_steps and max_time, at the current rate."""
        left = (self.cfg.max_steps - state.step) / max(steps_per_s, 1e-9)
        if self.cfg.max_time is not None:
            left = min(left, max(parse_duration(self.cfg.max_time) - self.run.clock.this_run(), 0.0))
        return left

    def show(self, record: dict, state: TrainState) -> None:
        if not self.bar.disable:
            self.bar.set_postfix(loss=f"{record['loss']:.3f}", lr=f"{record['lr']:.2e}",
                                 tok_s=f"{record['tgt_tokens_per_s']:.0f}")
            return
        log.info("step %d/%d: loss %.3f, lr %.2e, %.0f tgt tokens/s, elapsed %s, ETA %s", state.step,
                 self.cfg.max_steps, record["loss"], record["lr"], record["tgt_tokens_per_s"],
                 _duration(self.run.clock.total()), _duration(self.eta(state, record["steps_per_s"])))

    def say(self, message: str) -> None:
        """A line between bar updates (validation results)."""
        if not self.bar.disable:
            self.bar.write(message, file=sys.stderr)
        else:
            log.info("%s", message)

    def close(self) -> None:
        self.bar.close()


def _open_log(run: Run, state: TrainState):
    """log.jsonl for appending; a fresh start (step 0) starts a fresh log."""
    path = run.run_dir / "log.jsonl"
    log_file = open(path, "a" if state.step else "w", encoding="utf-8")  # closed by _loop
    if not state.step and state.init_from:
        _write(log_file, {"step": 0, **run.clock.stamp(), "init_from": state.init_from})
    return log_file


def _loop(run: Run, state: TrainState) -> None:
    """The training loop with its progress and log file, closed however it ends."""
    main = run.ranks.main
    log_file = _open_log(run, state) if main else None
    progress = _Progress(run, state)
    try:
        stop = _steps(run, state, progress, log_file)
        if log_file:
            _write(log_file, {"step": state.step, **run.clock.stamp(), "stopped": stop})
    finally:
        progress.close()  # before any error line, so it starts a line of its own
        if log_file:
            log_file.close()
    log.info("stopped at step %d: %s; best valid BLEU %.2f; %s elapsed", state.step, stop,
             state.best_bleu or 0.0, _duration(run.clock.total()))


def _write(log_file, record: dict) -> None:
    log_file.write(json.dumps(record) + "\n")
    log_file.flush()


def _out_of_time(run: Run, state: TrainState, reserve: float) -> bool:
    """train.max_time reached, counting the final validation and save (`reserve`, as the last one
    took); with several ranks rank 0 decides at log intervals, so all stop at the same step."""
    t = run.cfg.train
    if t.max_time is None or (run.ranks.world > 1 and state.step % t.log_every):
        return False
    return _broadcast(run.clock.this_run() + reserve >= parse_duration(t.max_time), run.ranks)


def _steps(run: Run, state: TrainState, progress: _Progress, log_file) -> str:
    """Steps, logging, validation, checkpoints, until a reason to stop, which it returns."""
    cfg, t, ranks = run.cfg, run.cfg.train, run.ranks
    prepared = run.data.training_pairs()
    group_size = t.accum_steps * ranks.world
    run.model.train()
    window, parts, lr = _Window(run.device), 1, 0.0
    stop = f"reached max_steps {t.max_steps}" if state.step >= t.max_steps else None
    validated_at = state.step  # a resumed run restarts from a validated checkpoint
    reserve = 0.0  # how long the last validation and save took: the final one must fit in max_time
    bad_run = torch.zeros((), device=run.device)  # consecutive skipped (non-finite) steps
    alpha = cfg.tokenizer.sampling_alpha
    sampler = Resegmenter(run.data.vocab, *prepared, alpha, cfg.model.max_positions - 1) if alpha else None
    while stop is None:
        src, tgt = prepared
        if sampler is not None:  # the epoch's pairs segmented anew, then batched by their drawn lengths
            src, tgt = sampler.draw(t.seed, state.epoch)
        epoch = (src.lengths, tgt.lengths, state.max_tokens, t.seed, state.epoch, group_size, t.pool_size,
                 state.batch_in_epoch // group_size)
        # One build of the epoch's batches for both readers; tee holds only what the loader's
        # prefetch is ahead of the loop.
        for_loader, for_steps = tee(step_groups(*epoch))
        batches = iter(_loader(src, tgt, rank_batches(for_loader, ranks.rank, ranks.world), run.device))
        for group in for_steps:
            host = [next(batches) for _ in range(t.accum_steps)]
            n_tokens = _target_tokens(tgt, group)
            micro = [_to_device(b, run.device) for b in host]
            lr = learning_rate(state.step + 1, cfg.model.d_model, t.warmup_steps, t.lr_factor, t.lr_decay,
                               t.max_steps)
            out, parts = train_step(run.step_model, run.optimizer, micro, n_tokens, ranks.world, lr, t,
                                    run.autocast, parts)
            state.step += 1
            state.batch_in_epoch += group_size
            window.add(out, group, src, tgt, n_tokens)
            bad_run = (bad_run + out["skipped"]) * out["skipped"]
            progress.step()
            if state.step % t.log_every == 0:
                _log_window(run, window, state, lr, progress, log_file, bad_run)
            if state.step >= t.max_steps:
                stop = f"reached max_steps {t.max_steps}"
            elif _out_of_time(run, state, reserve):
                budget = t.max_time if isinstance(t.max_time, str) else f"{t.max_time:g}s"
                stop = f"reached max_time {budget} (this invocation; --resume continues)"
            if state.step % t.valid_every == 0 or stop is not None:
                began = time.monotonic()
                stop, validated_at = _validate_and_save(run, state, progress, log_file) or stop, state.step
                reserve = time.monotonic() - began
            if stop is not None:
                break
        else:
            if not state.batch_in_epoch:  # not one step in a whole epoch
                raise UserError(f"{run.data.dir}: too few training batches for {group_size} per step")
            state.epoch, state.batch_in_epoch = state.epoch + 1, 0
            if t.max_epochs is not None and state.epoch >= t.max_epochs:
                stop = f"reached max_epochs {t.max_epochs}"
    if state.step != validated_at:  # stopped between validations (max_epochs)
        _validate_and_save(run, state, progress, log_file)
    return stop


def _target_tokens(tgt: TokenArray | Selection | Drawn, batches: list[np.ndarray]) -> int:
    """Target tokens (EOS included) of these batches, as prepared or as drawn for the epoch."""
    return sum(int(tgt.lengths[idx].sum()) + len(idx) for idx in batches)


def _log_window(run: Run, window: _Window, state: TrainState, lr: float, progress: _Progress, log_file,
                bad_run: torch.Tensor) -> None:
    record, window_steps = window.record(state, lr, run.ranks), window.steps
    record.update(run.clock.stamp())
    window.reset()
    if record["skipped_steps"]:
        log.warning("step %d: %d of the last %d updates skipped for a non-finite gradient norm",
                    state.step, record["skipped_steps"], window_steps)
    if log_file:
        _write(log_file, record)
    progress.show(record, state)
    if int(bad_run) >= MAX_BAD_STEPS:
        raise UserError(f"training diverged: {int(bad_run)} non-finite steps in a row; lower train.lr_factor")


def _validate_and_save(run: Run, state: TrainState, progress: _Progress, log_file) -> str | None:
    """Rank 0 validates, writes step/best checkpoints and curves; returns a reason to stop, or None."""
    stop = None
    if run.ranks.main:
        stop = _validate_and_save_main(run, state, progress, log_file)
    _barrier(run.ranks)
    return _broadcast(stop, run.ranks)


def _validate_and_save_main(run: Run, state: TrainState, progress: _Progress, log_file) -> str | None:
    ckpt_dir = run.run_dir / "checkpoints"
    bad = [name for name, p in run.model.named_parameters() if not bool(torch.isfinite(p).all())]
    if bad:  # before validation, which cannot decode with them; no checkpoint of them is written
        kept = step_checkpoints(ckpt_dir)
        raise UserError(f"training diverged: non-finite weights in {', '.join(bad[:3])} at step "
                        f"{state.step}, not saved (newest checkpoint: {kept[-1] if kept else 'none'}); "
                        "lower train.lr_factor")
    metrics = validate(run.model, run.translator, run.data, run.cfg, run.autocast, state.max_tokens)
    record = {"step": state.step, "epoch": state.epoch + 1, **metrics, **run.clock.stamp()}
    state.history.append(record)
    _write(log_file, record)
    each = "".join(f"; {name} loss {d['valid_loss']:.3f}, BLEU {d['valid_bleu']:.2f}"
                   for name, d in metrics.get("directions", {}).items())
    progress.say(f"step {state.step}: valid loss {metrics['valid_loss']:.3f}, "
                 f"ppl {metrics['valid_ppl']:.2f}, BLEU {metrics['valid_bleu']:.2f}{each}")
    improved = state.best_bleu is None or metrics["valid_bleu"] > state.best_bleu
    if improved:
        state.best_bleu, state.bad_validations = metrics["valid_bleu"], 0
    else:
        state.bad_validations += 1
    state.elapsed = run.clock.total()
    save_checkpoint(_checkpoint(run, state), ckpt_dir / f"step_{state.step:08d}.pt")
    if improved:
        save_checkpoint(_checkpoint(run, state, with_train_state=False), ckpt_dir / BEST)
    prune(ckpt_dir, run.cfg.train.keep_last)
    plot_curves(run.run_dir / "log.jsonl", run.run_dir / "curves.png")
    patience = run.cfg.train.patience
    if patience is not None and state.bad_validations >= patience:
        return f"no BLEU improvement in {patience} validations"
    return None
