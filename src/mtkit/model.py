"""The Transformer of Vaswani et al. (2017), "Attention Is All You Need": Figure 1, sections 3.1-3.5.

Mask convention for the whole package: a boolean mask is True where a query may attend to a key.
Shapes: B batch, S source length, T target length, H heads, D d_model, V vocabulary.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from mtkit.config import ModelConfig

PAD, UNK, BOS, EOS = 0, 1, 2, 3


def sinusoids(length: int, d_model: int) -> torch.Tensor:
    """Section 3.5: PE(pos, 2i) = sin(pos / 10000^(2i/d)), PE(pos, 2i+1) = cos(same)."""
    pos = torch.arange(length, dtype=torch.float64)[:, None]
    inv = torch.pow(10000.0, -torch.arange(0, d_model, 2, dtype=torch.float64) / d_model)
    pe = torch.zeros(length, d_model, dtype=torch.float64)
    pe[:, 0::2] = torch.sin(pos * inv)
    pe[:, 1::2] = torch.cos(pos * inv)
    return pe.float()  # (length, D)


class Embedding(nn.Module):
    """Section 3.4 + 3.5: token embedding times sqrt(d_model), plus sinusoidal positions, dropout."""

    def __init__(self, vocab_size: int, cfg: ModelConfig):
        super().__init__()
        self.tokens = nn.Embedding(vocab_size, cfg.d_model, padding_idx=PAD)
        nn.init.normal_(self.tokens.weight, mean=0.0, std=cfg.d_model**-0.5)
        nn.init.zeros_(self.tokens.weight[PAD])
        self.register_buffer("pe", sinusoids(cfg.max_positions, cfg.d_model), persistent=False)
        self.scale = math.sqrt(cfg.d_model)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, ids: torch.Tensor, start: int = 0) -> torch.Tensor:
        x = self.tokens(ids) * self.scale + self.pe[start : start + ids.size(1)]  # (B, L, D)
        return self.dropout(x) if self.training else x


MATH_ATTENTION_MAX = 2560
"""CPU inference attends with two batched matmuls where queries x keys per head is at most this:
2-6x faster than SDPA's CPU kernel on decoding steps and short sentences; SDPA's blocked kernel
wins on long ones (2.6x at 256 x 256, 2 cores)."""

SMALL_BMM = 400
"""torch's CPU bmm multiplies matrices of fewer multiply-adds than this (rows x columns x inner)
with a plain loop, 2-6x slower than MKL's: the first 6 decoding steps' self-attention at d_k 64.
Those multiply elementwise and sum instead (2.5-3.6x faster there, 1 thread)."""

SMALL_SOFTMAX = 16
"""torch's CPU softmax over a last dimension shorter than its 16-float vector is slow (3.5-5x
slower at 8-15 keys than exp and sum, which it beats from 16 on)."""


def softmax_(scores: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dimension; exp and sum, in place unless autograd needs the scores,
    where that is faster (fewer than SMALL_SOFTMAX)."""
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


class KVCache:
    """One decoder layer's self-attention keys/values while decoding step by step (B, H, t, d_k).

    Beam search gathers the surviving rows after every step; the gather writes into tensors one
    position longer, so the next step stores its keys in that free slot instead of concatenating
    (one copy of the cache per step instead of two). Without a reorder (greedy) appends concatenate.
    """

    def __init__(self) -> None:
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None
        self.length = 0

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Add one position (B, H, 1, d_k); returns the keys and values so far."""
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
        """Keep rows `index` (each surviving hypothesis's parent), in that order."""
        self.k, self.v = (self._gather(x, index) for x in (self.k, self.v))

    def _gather(self, x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        out = x.new_empty(index.numel(), x.size(1), self.length + 1, x.size(3))
        torch.index_select(x[:, :, : self.length], 0, index, out=out[:, :, : self.length])
        return out


class MultiHeadAttention(nn.Module):
    """Section 3.2.2: h parallel scaled dot-product attentions over learned projections."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.h, self.d_k = cfg.n_heads, cfg.d_model // cfg.n_heads
        self.q = nn.Linear(cfg.d_model, cfg.d_model)
        self.k = nn.Linear(cfg.d_model, cfg.d_model)
        self.v = nn.Linear(cfg.d_model, cfg.d_model)
        self.out = nn.Linear(cfg.d_model, cfg.d_model)
        self.p_attn = cfg.attention_dropout
        self.qkv: nn.Module | None = None  # inference may fuse q, k, v into one (D -> 3D) layer

    def split(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(x.size(0), x.size(1), self.h, self.d_k).transpose(1, 2)  # (B, H, L, d_k)

    def project_kv(self, memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of `memory`, computed once per source for cross-attention."""
        return self.split(self.k(memory)), self.split(self.v(memory))

    def project_qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Self-attention's queries, keys and values of x: one matmul where inference fused them."""
        if self.qkv is None:  # keys and values first, as before: autograd sums x's gradient in that order
            k, v = self.project_kv(x)
            return self.split(self.q(x)), k, v
        q, k, v = self.qkv(x).chunk(3, -1)
        return self.split(q), self.split(k), self.split(v)

    def weights(self, x: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor],
                mask: torch.Tensor | None = None) -> torch.Tensor:
        """Equation 1's softmax(Q K^T / sqrt(d_k)), (B, H, Lq, Lk), for pictures."""
        return self._softmax(self.split(self.q(x)), kv[0], mask)

    def _softmax(self, q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        scores = _scores(q, k).mul_(1.0 / math.sqrt(q.size(3)))  # (B, H, Lq, Lk)
        if mask is not None:
            scores.masked_fill_(~mask, float("-inf"))
        return softmax_(scores)

    def forward(self, x: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor],
                mask: torch.Tensor | None = None, causal: bool = False) -> torch.Tensor:
        return self.attend(self.split(self.q(x)), kv, mask, causal)

    def attend(self, q: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor],
               mask: torch.Tensor | None = None, causal: bool = False) -> torch.Tensor:
        """Projected queries (B, H, Lq, d_k) attend to keys/values; heads joined, projected out."""
        B, H, Lq, d_k = q.shape
        group = B // kv[0].size(0)  # > 1 in beam search: the K hypotheses of a sentence share its source
        if group > 1:  # their queries attend together to one copy of the keys: (B / K, H, K * Lq, d_k)
            q = q.view(-1, group, H, Lq, d_k).transpose(1, 2).reshape(-1, H, group * Lq, d_k)
        if self.training or causal or q.device.type != "cpu" or q.size(2) * kv[0].size(2) > MATH_ATTENTION_MAX:
            p = self.p_attn if self.training else 0.0
            y = F.scaled_dot_product_attention(q, kv[0], kv[1], attn_mask=mask, dropout_p=p, is_causal=causal)
        else:  # CPU inference with few queries (decoding steps) or short keys: two batched matmuls
            y = _mix(self._softmax(q, kv[0], mask), kv[1])
        if group > 1:
            y = y.view(-1, H, group, Lq, d_k).transpose(1, 2).reshape(B, H, Lq, d_k)
        return self.out(y.transpose(1, 2).flatten(2))  # (B, Lq, D)


class FeedForward(nn.Module):
    """Section 3.3: FFN(x) = max(0, x W1 + b1) W2 + b2."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.w1 = nn.Linear(cfg.d_model, cfg.d_ff)
        self.w2 = nn.Linear(cfg.d_ff, cfg.d_model)
        self.act = nn.ReLU()  # a module, so inference can fold it into w1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(self.act(self.w1(x)))


class Residual(nn.Module):
    """Section 5.4: LayerNorm(x + Dropout(Sublayer(x))) (post-norm); pre-norm as an option."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.norm = nn.LayerNorm(cfg.d_model)
        self.dropout = nn.Dropout(cfg.dropout)
        self.pre = cfg.norm == "pre"

    def forward(self, x: torch.Tensor, sublayer) -> torch.Tensor:
        # Pre-norm, a departure from the paper on request: x + Dropout(Sublayer(LayerNorm(x))).
        y = sublayer(self.norm(x) if self.pre else x)
        if self.training:  # decoding skips the no-op call
            y = self.dropout(y)
        return x + y if self.pre else self.norm(x + y)


class EncoderLayer(nn.Module):
    """Section 3.1: self-attention, then the feed-forward network."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attn, self.ffn = MultiHeadAttention(cfg), FeedForward(cfg)
        self.res1, self.res2 = Residual(cfg), Residual(cfg)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        def self_attention(y: torch.Tensor) -> torch.Tensor:
            q, k, v = self.attn.project_qkv(y)
            return self.attn.attend(q, (k, v), mask)

        x = self.res1(x, self_attention)
        return self.res2(x, self.ffn)


class DecoderLayer(nn.Module):
    """Section 3.1: masked self-attention, encoder-decoder attention, feed-forward network."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.self_attn, self.cross_attn = MultiHeadAttention(cfg), MultiHeadAttention(cfg)
        self.ffn = FeedForward(cfg)
        self.res1, self.res2, self.res3 = Residual(cfg), Residual(cfg), Residual(cfg)

    def forward(self, x: torch.Tensor, cross_kv: tuple, src_mask: torch.Tensor,
                cache: KVCache | None = None) -> torch.Tensor:
        def self_attention(y: torch.Tensor) -> torch.Tensor:
            q, k, v = self.self_attn.project_qkv(y)
            if cache is None:  # full target: causal mask, position i sees 0..i
                return self.self_attn.attend(q, (k, v), causal=True)
            return self.self_attn.attend(q, cache.append(k, v))  # one new position sees all cached so far

        x = self.res1(x, self_attention)
        x = self.res2(x, lambda y: self.cross_attn(y, cross_kv, src_mask))
        return self.res3(x, self.ffn)


class Transformer(nn.Module):
    """Figure 1: encoder and decoder stacks of n_layers each, tied embeddings, output softmax."""

    def __init__(self, cfg: ModelConfig, src_vocab: int, tgt_vocab: int):
        super().__init__()
        self.cfg = cfg
        self.src_embed = Embedding(src_vocab, cfg)
        self.tgt_embed = self.src_embed if cfg.share_embeddings else Embedding(tgt_vocab, cfg)
        self.encoder = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.n_layers))
        self.decoder = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.n_layers))
        # Pre-norm needs a final LayerNorm on each stack; post-norm ends in one already.
        self.enc_norm = nn.LayerNorm(cfg.d_model) if cfg.norm == "pre" else nn.Identity()
        self.dec_norm = nn.LayerNorm(cfg.d_model) if cfg.norm == "pre" else nn.Identity()
        # Inference may install the output projection as a module of its own (same weights) so it
        # can be quantised or repacked; training leaves it None and uses the shared matrix.
        self.output: nn.Module | None = None
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)

    def encode(self, src: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """src (B, S) -> memory (B, S, D) and the source mask (B, 1, 1, S)."""
        mask = (src != PAD)[:, None, None, :]
        x = self.src_embed(src)
        for layer in self.encoder:
            x = layer(x, mask)
        return self.enc_norm(x), mask

    def cross_kv(self, memory: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Encoder keys/values for every decoder layer, projected once per source."""
        return [layer.cross_attn.project_kv(memory) for layer in self.decoder]

    def new_cache(self) -> list[KVCache]:
        """Empty self-attention caches, one per decoder layer, for incremental decoding."""
        return [KVCache() for _ in self.decoder]

    def decode(self, tgt_in: torch.Tensor, cross: list, src_mask: torch.Tensor,
               cache: list[KVCache] | None = None, start: int = 0) -> torch.Tensor:
        """tgt_in (B, T) -> logits (B, T, V); with `cache`, tgt_in is the one position `start`."""
        x = self.tgt_embed(tgt_in, start)
        for i, layer in enumerate(self.decoder):
            x = layer(x, cross[i], src_mask, None if cache is None else cache[i])
        x = self.dec_norm(x)
        if self.output is not None:
            return self.output(x)
        # Section 3.4: the pre-softmax projection shares the target embedding matrix.
        return F.linear(x, self.tgt_embed.tokens.weight)

    def forward(self, src: torch.Tensor, tgt_in: torch.Tensor) -> torch.Tensor:
        """Teacher-forced logits (B, T, V) for training."""
        memory, mask = self.encode(src)
        return self.decode(tgt_in, self.cross_kv(memory), mask)


def count_parameters(model: nn.Module) -> int:
    """Trainable parameters, shared matrices counted once."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
