"""The compute of training: model and optimizer, autocast, torch.compile, DDP, one optimizer step
(with out-of-memory split-and-retry), and the probe that finds the largest batch that fits.

Nothing here reads files or logs metrics; `train.py` drives it. `scripts/bench_train.py` times
exactly these functions.
"""

from __future__ import annotations

import logging
import os
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from mtkit.config import TrainConfig
from mtkit.data.vocab import PAD
from mtkit.device import Precision, pick_device
from mtkit.model import Transformer

log = logging.getLogger("mtkit")

CPU_AUTO_MAX_TOKENS = 4096


@dataclass(frozen=True)
class Dist:
    """This process's place in a (torchrun) process group; rank 0 of world 1 when run alone."""

    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device_name: str) -> tuple[Dist, torch.device]:
    """Join the process group torchrun describes in RANK/WORLD_SIZE (NCCL on CUDA, gloo on CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = pick_device(device_name)
    if world == 1:
        return Dist(), device
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Dist(rank, world), device


class ComputeContext:
    """Autocast in the run's precision (none in fp32), the gradient scaler fp16 needs, and on CPU
    SDPA's math kernel (its fused CPU kernels measured slower for training steps). Re-enterable."""

    def __init__(self, device: torch.device, precision: Precision):
        self.device, self.precision = device, precision
        # fp16's range underflows small gradients: scale the loss up, unscale before the update.
        self.scaler = torch.amp.GradScaler(device.type) if precision.scaled else None

    def __enter__(self) -> "ComputeContext":
        self.stack = ExitStack()
        if self.precision.dtype is not None:
            self.stack.enter_context(torch.autocast(self.device.type, dtype=self.precision.dtype))
        if self.device.type == "cpu":
            self.stack.enter_context(sdpa_kernel([SDPBackend.MATH]))
        return self

    def __exit__(self, *exc) -> bool:
        return self.stack.__exit__(*exc)


class _SmoothedCrossEntropy(torch.autograd.Function):
    """Section 5.4's loss with its gradient written out, softmax minus the smoothed target: one
    saved (N, V) tensor instead of autograd's chain of vocabulary-sized intermediates (log-softmax,
    gather, sum, each one's backward, and the sum of the two gradients)."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, target: torch.Tensor, epsilon: float):
        lprobs = logits.float().log_softmax(-1)  # (N, V)
        drop = target == PAD
        nll = -lprobs.gather(1, target[:, None]).squeeze(1).masked_fill(drop, 0.0)  # (N,)
        smooth = -lprobs.sum(-1).masked_fill(drop, 0.0) / lprobs.size(-1)
        ctx.save_for_backward(lprobs, target)
        ctx.epsilon, ctx.dtype = epsilon, logits.dtype
        nll_sum = nll.sum()
        ctx.mark_non_differentiable(nll_sum)
        return (1.0 - epsilon) * nll_sum + epsilon * smooth.sum(), nll_sum

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor, _grad_nll: torch.Tensor):
        lprobs, target = ctx.saved_tensors
        eps = ctx.epsilon
        grad = lprobs.exp().sub_(eps / lprobs.size(-1))  # p - eps / V ...
        grad.scatter_add_(1, target[:, None],
                          grad.new_full((target.numel(), 1), eps - 1.0))  # ... - (1 - eps) y
        grad.mul_(((target != PAD).to(grad.dtype) * grad_loss)[:, None])
        return grad.to(ctx.dtype), None, None


def label_smoothed_loss(logits: torch.Tensor, target: torch.Tensor,
                        epsilon: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Section 5.4: cross-entropy against (1 - eps) * one-hot + eps / V; sums over non-pad tokens.

    Returns (smoothed loss sum, negative log-likelihood sum, the latter without gradient).
    """
    return _SmoothedCrossEntropy.apply(logits.reshape(-1, logits.size(-1)), target.reshape(-1), epsilon)


def rdrop_loss(logits: torch.Tensor, target: torch.Tensor, epsilon: float,
               alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """R-Drop (Liang et al., 2021) on the logits of a batch stacked twice (2B rows, two dropout
    masks): (CE1 + CE2) / 2 + alpha * (KL(p1 || p2) + KL(p2 || p1)) / 4, summed over non-pad target
    tokens. That is Liang et al.'s loss halved, so that the loss keeps the scale of one pass (and the
    learning rate its meaning) while their alpha means the same here.

    Returns (loss sum, the two passes' mean negative log-likelihood sum, without gradient).
    """
    both = target.repeat(2, 1)
    loss, nll = label_smoothed_loss(logits, both, epsilon)
    logp, logq = logits.float().log_softmax(-1).chunk(2)
    kl = (logp.exp() * (logp - logq) + logq.exp() * (logq - logp)).sum(-1)  # KL(p||q) + KL(q||p)
    kl = kl.masked_fill(target == PAD, 0.0).sum()
    return loss / 2 + alpha * kl / 4, nll / 2


def make_optimizer(model: nn.Module, t: TrainConfig) -> torch.optim.Optimizer:
    """Section 5.3: Adam(0.9, 0.98, 1e-9) (AdamW with weight decay), fused: one kernel per step,
    and able to skip a non-finite step on the device without a host sync (`found_inf`)."""
    opt_cls = torch.optim.AdamW if t.weight_decay else torch.optim.Adam
    return opt_cls(model.parameters(), lr=0.0, betas=t.adam_betas, eps=t.adam_eps,
                   weight_decay=t.weight_decay, fused=True)


def wrap_model(model: Transformer, t: TrainConfig, device: torch.device, ranks: Dist) -> nn.Module:
    """The module the training step calls: DDP across ranks, then torch.compile when enabled."""
    step_model: nn.Module = model
    if ranks.world > 1:
        step_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    if t.compile is True or (t.compile == "auto" and device.type == "cuda"):
        step_model = torch.compile(step_model, dynamic=True)
    return step_model


def _split(batch: dict[str, torch.Tensor], parts: int) -> list[dict[str, torch.Tensor]]:
    """Rows of a batch in `parts` pieces (fewer when it has fewer rows)."""
    return [dict(zip(batch, chunk)) for chunk in zip(*(v.chunk(parts) for v in batch.values()))]


def _backward_all(step_model: nn.Module, micro: list[dict], scale: float, t: TrainConfig,
                  autocast: ComputeContext, parts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward and backward of every micro-batch, each cut into `parts`; DDP syncs on the last."""
    pieces = [p for b in micro for p in _split(b, parts)]
    loss_sum = nll_sum = torch.zeros((), device=pieces[0]["src"].device)
    for i, b in enumerate(pieces):
        last = i == len(pieces) - 1
        no_sync = getattr(step_model, "no_sync", None)
        with (nullcontext() if last or no_sync is None else no_sync()):
            if t.rdrop_alpha:
                with autocast:  # the batch twice in one pass: two dropout masks
                    logits = step_model(b["src"].repeat(2, 1), b["tgt_in"].repeat(2, 1))
                loss, nll = rdrop_loss(logits, b["tgt_out"], t.label_smoothing, t.rdrop_alpha)
            else:
                with autocast:
                    logits = step_model(b["src"], b["tgt_in"])
                loss, nll = label_smoothed_loss(logits, b["tgt_out"], t.label_smoothing)
            scaled = loss * scale
            (scaled if autocast.scaler is None else autocast.scaler.scale(scaled)).backward()
        loss_sum, nll_sum = loss_sum + loss.detach(), nll_sum + nll
    return loss_sum, nll_sum


def train_step(step_model: nn.Module, optimizer: torch.optim.Optimizer, micro: list[dict],
               n_tokens: int, world: int, lr: float, t: TrainConfig, autocast: ComputeContext,
               parts: int = 1) -> tuple[dict[str, torch.Tensor], int]:
    """One optimizer step over the micro-batches of this rank, with no host-device sync.

    The loss is divided by `n_tokens`, the non-pad target tokens of the whole step on all ranks
    (known from the batch index, no communication), times `world` because DDP averages gradients:
    1 process with accumulation 2 and 2 processes compute the same update. A non-finite gradient
    norm makes the fused optimizer skip the update on the device (in fp16 the gradient scaler
    does, and lowers its scale). On CUDA out-of-memory the
    step is redone with every micro-batch split in two (same gradient). Returns the step's sums
    (device tensors: loss, nll, norm, skipped) and the number of parts finally used.
    """
    scale = world / n_tokens
    while True:
        try:
            loss_sum, nll_sum = _backward_all(step_model, micro, scale, t, autocast, parts)
            break
        except torch.OutOfMemoryError:
            optimizer.zero_grad(set_to_none=True)
            if parts >= max(b["src"].size(0) for b in micro):
                raise
            parts *= 2
            log.warning("out of memory: retrying the step with batches split in %d", parts)
            torch.cuda.empty_cache()
    scaler = autocast.scaler
    if scaler is not None:  # fp16: unscale in place (recording overflows) before the norm
        scaler.unscale_(optimizer)
    params = [p for p in step_model.parameters() if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(params, t.clip_norm or float("inf"), foreach=True)
    skipped = (~torch.isfinite(norm)).float()
    for group in optimizer.param_groups:
        group["lr"] = lr
    if scaler is None:
        optimizer.found_inf = skipped  # the fused Adam kernel leaves weights and moments untouched
        optimizer.step()
    else:  # skips an overflowing step on the device and lowers the scale (raises it after 2000 good ones)
        scaler.step(optimizer)
        scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return {"loss": loss_sum, "nll": nll_sum, "norm": norm, "skipped": skipped}, parts


def fit_max_tokens(fits, low: int = 1024, high: int = 1 << 20) -> int:
    """Largest budget in [low, high] for which `fits(budget)` holds (doubling, then bisection to
    1/16 of the found power of two); `low` if even that fails. Marian's mini-batch-fit, in spirit."""
    if not fits(low):
        return low
    good = low
    while good * 2 <= high and fits(good * 2):
        good *= 2
    step, resolution = good // 2, max(good // 16, 1)
    while step >= resolution:
        if good + step <= high and fits(good + step):
            good += step
        step //= 2
    return good


def probe_max_tokens(model: Transformer, device: torch.device, longest: int, autocast: ComputeContext,
                     vocab_size: int) -> int:
    """train.max_tokens auto: on CUDA, the largest budget whose worst-case batch (all sentences of
    the longest length) survives forward and backward, with a 10% margin; on CPU a fixed 4096."""
    if device.type != "cuda":
        return CPU_AUTO_MAX_TOKENS

    def fits(budget: int) -> bool:
        rows = max(budget // longest, 1)
        ids = torch.randint(4, vocab_size, (rows, longest), device=device)
        try:
            with autocast:
                logits = model(ids, ids)
            label_smoothed_loss(logits, ids, 0.1)[0].backward()
            torch.cuda.synchronize(device)
            return True
        except torch.OutOfMemoryError:
            return False
        finally:
            model.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()

    budget = int(fit_max_tokens(fits) * 0.9)
    log.info("train.max_tokens auto: %d tokens per batch fit on %s", budget,
             torch.cuda.get_device_name(device))
    return budget
