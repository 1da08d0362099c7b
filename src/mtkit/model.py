"""The Transformer of Vaswani et al. (2017), "Attention Is All You Need": Figure 1, sections 3.1-3.5.

Mask convention for the whole package: a boolean mask is True where a query may attend to a key.
Shapes: B batch, S source length, T target length, H heads, D d_model, V vocabulary.

This module is the paper and nothing else: decoding backends (mtkit.inference) may swap in other
attention kernels or layers for one device, but never change what is computed here.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from mtkit.config import ModelConfig
from mtkit.data.vocab import PAD

if TYPE_CHECKING:  # decoding state: what search keeps between steps
    from mtkit.inference import KVCache

Kernel = Callable[..., torch.Tensor]
"""kernel(q, k, v, mask, causal, dropout_p) -> (B, H, Lq, d_v): equation 1 over (B, H, L, d_k)
queries, keys and values; mask (True: may attend) broadcasts to (B, H, Lq, Lk); causal lets
query i see keys 0..i; a query with no key to attend to gets zeros."""


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None,
         causal: bool = False, dropout_p: float = 0.0) -> torch.Tensor:
    """Equation 1, softmax(Q K^T / sqrt(d_k)) V, by torch's scaled_dot_product_attention."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=causal)


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
        return self.dropout(self.tokens(ids) * self.scale + self.pe[start : start + ids.size(1)])  # (B, L, D)


class TiedOutput(nn.Module):
    """Section 3.4: the pre-softmax projection shares the target embedding matrix: logits = x E^T.
    The matrix is the embedding's parameter, not one of this module's; `bias` (not in the paper,
    model.output_bias) adds a learned bias, as Marian's models have."""

    def __init__(self, embedding: nn.Embedding, bias: bool = False):
        super().__init__()
        self._embedding = (embedding,)  # a tuple: not registered a second time
        self.bias = nn.Parameter(torch.zeros(embedding.num_embeddings)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self._embedding[0].weight, self.bias)  # (B, T, V)


class MultiHeadAttention(nn.Module):
    """Section 3.2.2: h parallel scaled dot-product attentions (`kernel`) over learned projections."""

    def __init__(self, cfg: ModelConfig, kernel: Kernel = sdpa):
        super().__init__()
        self.h, self.d_k = cfg.n_heads, cfg.d_model // cfg.n_heads
        self.q = nn.Linear(cfg.d_model, cfg.d_model)
        self.k = nn.Linear(cfg.d_model, cfg.d_model)
        self.v = nn.Linear(cfg.d_model, cfg.d_model)
        self.out = nn.Linear(cfg.d_model, cfg.d_model)
        self.p_attn = cfg.attention_dropout
        self.kernel = kernel

    def split(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(x.size(0), x.size(1), self.h, self.d_k).transpose(1, 2)  # (B, H, L, d_k)

    def project_q(self, x: torch.Tensor) -> torch.Tensor:
        return self.split(self.q(x))

    def project_kv(self, memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of `memory`, computed once per source for cross-attention."""
        return self.split(self.k(memory)), self.split(self.v(memory))

    def project_qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Self-attention's queries, keys and values, all of x."""
        k, v = self.project_kv(x)  # keys and values first: autograd sums x's gradient in this order
        return self.project_q(x), k, v

    def weights(self, x: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor],
                mask: torch.Tensor | None = None, group: int = 1) -> torch.Tensor:
        """Equation 1's softmax(Q K^T / sqrt(d_k)), (B, H, Lq, Lk), for pictures and alignments."""
        q, k = self.project_q(x), kv[0]
        if group > 1:  # one row of keys and mask per `group` rows of queries (see `attend`)
            k = k.repeat_interleave(group, 0)
            mask = None if mask is None else mask.repeat_interleave(group, 0)
        scores = q @ k.transpose(-2, -1) / math.sqrt(self.d_k)
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        return scores.softmax(-1)

    def forward(self, x: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor],
                mask: torch.Tensor | None = None, group: int = 1) -> torch.Tensor:
        return self.attend(self.project_q(x), kv, mask, group=group)

    def attend(self, q: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor], mask: torch.Tensor | None = None,
               causal: bool = False, group: int = 1) -> torch.Tensor:
        """Projected queries (B, H, Lq, d_k) attend to keys/values; heads joined, projected out.

        `group` > 1: kv has one row per `group` consecutive query rows (in beam search, the K
        hypotheses of a sentence share its source), which attend together to that one copy.
        """
        B, H, Lq, d_k = q.shape
        if group > 1:  # (B / K, H, K * Lq, d_k)
            q = q.view(-1, group, H, Lq, d_k).transpose(1, 2).reshape(-1, H, group * Lq, d_k)
        y = self.kernel(q, kv[0], kv[1], mask, causal, self.p_attn if self.training else 0.0)
        if group > 1:
            y = y.view(-1, H, group, Lq, d_k).transpose(1, 2).reshape(B, H, Lq, d_k)
        return self.out(y.transpose(1, 2).flatten(2))  # (B, Lq, D)


ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": torch.relu, "swish": F.silu, "gelu": F.gelu}
"""model.activation: the paper's max(0, x), or x * sigmoid(x) and the exact (erf) GELU of models
made elsewhere."""


class FeedForward(nn.Module):
    """Section 3.3: FFN(x) = max(0, x W1 + b1) W2 + b2 (max(0, .) replaced by model.activation)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.w1 = nn.Linear(cfg.d_model, cfg.d_ff)
        self.w2 = nn.Linear(cfg.d_ff, cfg.d_model)
        self.activation = ACTIVATIONS[cfg.activation]
        self.p_hidden = cfg.activation_dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.activation(self.w1(x))
        if self.p_hidden and self.training:
            hidden = F.dropout(hidden, self.p_hidden, training=True)
        return self.w2(hidden)


class Residual(nn.Module):
    """Section 5.4: LayerNorm(x + Dropout(Sublayer(x))) (post-norm); pre-norm as an option."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.norm = nn.LayerNorm(cfg.d_model)
        self.dropout = nn.Dropout(cfg.dropout)
        self.pre = cfg.norm == "pre"

    def forward(self, x: torch.Tensor, sublayer: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        if self.pre:  # a departure from the paper on request: x + Dropout(Sublayer(LayerNorm(x)))
            return x + self.dropout(sublayer(self.norm(x)))
        return self.norm(x + self.dropout(sublayer(x)))


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

    def forward(self, x: torch.Tensor, cross_kv: tuple, src_mask: torch.Tensor, cache: KVCache | None = None,
                group: int = 1) -> torch.Tensor:
        def self_attention(y: torch.Tensor) -> torch.Tensor:
            q, k, v = self.self_attn.project_qkv(y)
            if cache is None:  # the whole target: position i sees 0..i
                return self.self_attn.attend(q, (k, v), causal=True)
            return self.self_attn.attend(q, cache.append(k, v))  # one new position sees all so far

        x = self.res1(x, self_attention)
        x = self.res2(x, lambda y: self.cross_attn(y, cross_kv, src_mask, group))
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
        self.output = TiedOutput(self.tgt_embed.tokens, cfg.output_bias)
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

    def decode(self, tgt_in: torch.Tensor, cross: list, src_mask: torch.Tensor,
               cache: list[KVCache] | None = None, start: int = 0, group: int = 1) -> torch.Tensor:
        """tgt_in (B, T) -> logits (B, T, V); with `cache` (one per layer), tgt_in is the one
        position `start`; `group`: target rows per source row (see MultiHeadAttention.attend)."""
        x = self.tgt_embed(tgt_in, start)
        for i, layer in enumerate(self.decoder):
            x = layer(x, cross[i], src_mask, None if cache is None else cache[i], group)
        return self.output(self.dec_norm(x))

    def forward(self, src: torch.Tensor, tgt_in: torch.Tensor) -> torch.Tensor:
        """Teacher-forced logits (B, T, V) for training."""
        memory, mask = self.encode(src)
        return self.decode(tgt_in, self.cross_kv(memory), mask)


def count_parameters(model: nn.Module) -> int:
    """Trainable parameters, shared matrices counted once."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
