"""The CPU decoding backend: the same computation as model.py, in fp32 with the same outputs,
rearranged for the small matrices of step-by-step decoding on a CPU.

`install(model)` swaps, in place:
- every attention's kernel for `cpu_attention` (two batched matmuls at small sizes, where torch's
  SDPA kernel is slow; SDPA for long sequences);
- each self-attention for `FusedSelfAttention` (q, k and v as one layer: one matmul);
- the tied output projection for an nn.Linear sharing the embedding matrix, so it can be packed
  or quantised like the rest;
- every linear layer for a `PackedLinear` (weights in oneDNN's blocked layout, the feed-forward
  ReLU as its post-op), or, with int8, for torch's dynamically quantised linear layer.
Search then asks the returned `CPUBackend` for caches with a free slot, transposed encoder keys
and a blocked top-k. `tune_process` is process-wide allocator tuning, for programs that opt in
(the command line does). docs/performance.md has the measurements behind each threshold.
"""

from __future__ import annotations

import ctypes
import functools
import math
import warnings

import torch
from torch import nn

from mtkit.inference import Backend, KVCache
from mtkit.model import FeedForward, MultiHeadAttention, Transformer, sdpa

MATH_ATTENTION_MAX = 2560
"""Queries x keys per head up to which `cpu_attention` multiplies with two batched matmuls (decoding
steps and short sentences); above it SDPA's blocked kernel is faster."""

SMALL_BMM = 400
"""torch's CPU bmm multiplies matrices of fewer multiply-adds than this (rows x columns x inner)
with a plain loop, slower than MKL's (the first decoding steps' self-attention at d_k 64): those
are multiplied elementwise and summed instead."""

SMALL_SOFTMAX = 16
"""Fewer keys than this take exp and sum instead of torch's CPU softmax. Where that pays off
depends on the CPU's vector width: scripts/bench_kernels.py measures it (docs/performance.md)."""


def softmax_(scores: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dimension; below SMALL_SOFTMAX by exp and sum, in place unless
    autograd needs the scores."""
    if scores.size(-1) >= SMALL_SOFTMAX:
        return scores.softmax(-1)
    if scores.requires_grad:
        e = (scores - scores.amax(-1, keepdim=True)).exp()
        return e / e.sum(-1, keepdim=True)
    scores.sub_(scores.amax(-1, keepdim=True)).exp_()
    return scores.div_(scores.sum(-1, keepdim=True))


def _scores(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """q (B, H, Lq, d_k) . k (B, H, Lk, d_k) -> (B, H, Lq, Lk): bmm over B x H (fewer dispatched
    ops than 4-D matmul), or elementwise products summed where bmm would take its small loop."""
    (B, H, Lq, d_k), Lk = q.shape, k.size(2)
    if Lq * Lk * d_k < SMALL_BMM:
        return (q.unsqueeze(3) * k.unsqueeze(2)).sum(-1)
    return torch.bmm(q.flatten(0, 1), k.flatten(0, 1).transpose(1, 2)).view(B, H, Lq, Lk)


def _mix(p: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Attention weights (B, H, Lq, Lk) times values (B, H, Lk, d_v) -> (B, H, Lq, d_v), as `_scores`."""
    (B, H, Lq, Lk), d_v = p.shape, v.size(3)
    if Lq * Lk * d_v < SMALL_BMM:
        return (p.unsqueeze(4) * v.unsqueeze(2)).sum(3)
    return torch.bmm(p.flatten(0, 1), v.flatten(0, 1)).view(B, H, Lq, d_v)


def cpu_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None,
                  causal: bool = False, dropout_p: float = 0.0) -> torch.Tensor:
    """Equation 1 (the `mtkit.model.Kernel` contract): softmax(Q K^T / sqrt(d_k)) V by two batched
    matmuls where queries x keys is at most MATH_ATTENTION_MAX; SDPA for longer sequences, causal
    masks and dropout."""
    if causal or dropout_p > 0.0 or q.size(2) * k.size(2) > MATH_ATTENTION_MAX:
        return sdpa(q, k, v, mask, causal, dropout_p)
    scores = _scores(q, k).mul_(1.0 / math.sqrt(q.size(3)))  # (B, H, Lq, Lk)
    if mask is not None:
        scores.masked_fill_(~mask, float("-inf"))
    p = softmax_(scores)
    if mask is not None and not bool(mask.any(-1).all()):  # a query with no key: zeros, as SDPA gives
        p = p.masked_fill(~mask.any(-1, keepdim=True), 0.0)
    return _mix(p, v)


class SlotCache(KVCache):
    """A KVCache whose beam reorder writes into tensors one position longer, so the next step
    stores its keys in that free slot instead of concatenating: one copy of the cache per step
    instead of two. Without a reorder (greedy search) appends concatenate."""

    def __init__(self) -> None:
        super().__init__()
        self.length = 0

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        t = self.length
        if self.k is None:
            self.k, self.v = k, v
        elif t == self.k.size(2):  # no free slot
            self.k, self.v = torch.cat([self.k, k], 2), torch.cat([self.v, v], 2)
        else:
            self.k[:, :, t], self.v[:, :, t] = k[:, :, 0], v[:, :, 0]
        self.length = t + 1
        return self.k[:, :, : t + 1], self.v[:, :, : t + 1]

    def reorder(self, index: torch.Tensor) -> None:
        self.k, self.v = (self._gather(x, index) for x in (self.k, self.v))

    def _gather(self, x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        out = x.new_empty(index.numel(), x.size(1), self.length + 1, x.size(3))
        torch.index_select(x[:, :, : self.length], 0, index, out=out[:, :, : self.length])
        return out


class FusedSelfAttention(MultiHeadAttention):
    """A self-attention whose q, k and v projections of the same input are one (D -> 3D) layer."""

    def __init__(self, attn: MultiHeadAttention):
        nn.Module.__init__(self)
        self.h, self.d_k, self.p_attn, self.kernel = attn.h, attn.d_k, attn.p_attn, attn.kernel
        self.qkv = nn.Linear(attn.q.in_features, 3 * attn.q.out_features)
        with torch.no_grad():
            self.qkv.weight.copy_(torch.cat([attn.q.weight, attn.k.weight, attn.v.weight]))
            self.qkv.bias.copy_(torch.cat([attn.q.bias, attn.k.bias, attn.v.bias]))
        self.out = attn.out

    def project_qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q, k, v = self.qkv(x).chunk(3, -1)
        return self.split(q), self.split(k), self.split(v)

    def project_q(self, x: torch.Tensor) -> torch.Tensor:
        return self.project_qkv(x)[0]

    def project_kv(self, memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.project_qkv(memory)[1:]


class PackedLinear(nn.Module):
    """nn.Linear for CPU inference, its weight reordered once into oneDNN's blocked layout; takes
    and returns ordinary tensors (the packed matmul that torch.compile's CPU backend uses)."""

    def __init__(self, linear: nn.Linear, activation: str = "none", batch_hint: int = 256):
        super().__init__()
        self.activation = activation  # oneDNN post-op: "none" or "relu"
        weight = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), batch_hint)
        self.register_buffer("weight", weight)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, self.activation, [], "")


class PackedFeedForward(nn.Module):
    """FeedForward with packed layers, max(0, .) as the first one's post-op (another activation
    runs after it)."""

    def __init__(self, ffn: FeedForward):
        super().__init__()
        relu = ffn.activation is torch.relu
        self.w1, self.w2 = PackedLinear(ffn.w1, "relu" if relu else "none"), PackedLinear(ffn.w2)
        self.activation = None if relu else ffn.activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.w1(x)
        return self.w2(h if self.activation is None else self.activation(h))


def _pack(module: nn.Module) -> None:
    for name, child in module.named_children():
        if isinstance(child, FeedForward):
            setattr(module, name, PackedFeedForward(child))
        elif isinstance(child, nn.Linear):
            setattr(module, name, PackedLinear(child))
        else:
            _pack(child)


def can_pack() -> bool:
    """Whether this torch build has oneDNN's packed linear kernels."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


@functools.lru_cache
def _blocks(vocab: int) -> tuple[int, int] | None:
    """A split of the vocabulary into `per` blocks of `size` tokens (block j: tokens j, j + per,
    j + 2 per, ...) for `best_candidates`: size near 32, per a multiple of 4 (its strided max is
    fast on CPU); None when the vocabulary has no such split."""
    sizes = [a for a in range(16, 65) if vocab % a == 0 and (vocab // a) % 4 == 0]
    if not sizes:
        return None
    size = min(sizes, key=lambda a: abs(a - 32))
    return size, vocab // size


class CPUBackend(Backend):
    """Caches with a free slot, encoder keys stored transposed (the scores' K^T read without a
    copy), and a top-k that searches only the blocks of the vocabulary that can hold the best."""

    name = "cpu"

    def new_cache(self, model: Transformer) -> list[KVCache]:
        return [SlotCache() for _ in model.decoder]

    def memory_kv(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return k.transpose(2, 3).contiguous().transpose(2, 3), v.contiguous()

    def keep_rows(self, k: torch.Tensor, v: torch.Tensor,
                  keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return k.transpose(2, 3).index_select(0, keep).transpose(2, 3), v.index_select(0, keep)

    def best_candidates(self, logp: torch.Tensor, scores: torch.Tensor,
                        k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """As Backend's, without adding to or sorting the whole matrix: the vocabulary is split into
        blocks, and the k best candidates lie in the k blocks whose maxima are best, so only those
        are searched (the same values at the same indices)."""
        (n, width), V = scores.shape, logp.size(1)
        blocks = _blocks(V)
        if blocks is None or width * blocks[1] < k:
            return super().best_candidates(logp, scores, k)
        size, per = blocks
        maxima = logp.view(-1, size, per).amax(1).add_(scores.view(-1, 1)).view(n, width * per)
        best = maxima.topk(k, dim=1).indices  # (n, k): hypothesis * per + block
        beam = best.div(per, rounding_mode="floor")
        first = best + beam * (V - per)  # the block's first candidate: hypothesis * V + block
        index = (first.unsqueeze(-1) + torch.arange(0, V, per, device=logp.device)).view(n, k * size)
        values = logp.view(n, width * V).gather(1, index).view(n, k, size)
        top, pick = values.add_(scores.gather(1, beam).unsqueeze(-1)).view(n, k * size).topk(k, dim=1)
        return top, index.gather(1, pick)


def install(model: Transformer, quantize: str | None = None) -> CPUBackend:
    """Rewrite `model` in place for CPU decoding (see the module docstring); `quantize` "int8":
    dynamic int8 linear layers (weights per output channel) instead of packed fp32 ones."""
    if quantize not in (None, "int8"):
        raise ValueError(f"quantize={quantize!r}: only int8 is supported")
    model.eval()
    for module in model.modules():
        if isinstance(module, MultiHeadAttention):
            module.kernel = cpu_attention
    for layer in model.encoder:
        layer.attn = FusedSelfAttention(layer.attn)
    for layer in model.decoder:
        layer.self_attn = FusedSelfAttention(layer.self_attn)
    bias = model.output.bias
    output = nn.Linear(model.cfg.d_model, model.tgt_embed.tokens.num_embeddings, bias=bias is not None,
                       device="meta")
    output.weight = model.tgt_embed.tokens.weight  # the embedding matrix itself, as TiedOutput reads it
    if bias is not None:
        output.bias = bias
    model.output = output
    if quantize == "int8":
        with warnings.catch_warnings():  # torch.ao.quantization is deprecated in favour of torchao
            warnings.simplefilter("ignore")
            quant = torch.ao.quantization
            quant.quantize_dynamic(model, {nn.Linear: quant.per_channel_dynamic_qconfig}, dtype=torch.qint8,
                                   inplace=True)
    elif can_pack():
        _pack(model)
    return CPUBackend()


def tune_process() -> None:
    """Ask glibc to keep freed memory for reuse (process-wide; Linux glibc only, else nothing).

    CPU decoding allocates multi-megabyte tensors every step (logits, key/value caches). By default
    glibc maps such blocks afresh and unmaps or trims them when freed, so each step page-faults its
    memory in again. Blocks up to 32 MB then come from the heap, and up to 1 GB of free heap stays
    mapped. Affects every allocation of the process: the command line calls it; programs opt in.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3  # <malloc.h>
    libc.mallopt(m_mmap_threshold, 32 << 20)
    libc.mallopt(m_trim_threshold, 1 << 30)
    libc.mallopt(m_top_pad, 64 << 20)
