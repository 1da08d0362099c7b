"""Greedy and beam search over the model's incremental decoder (section 6.1 of the paper), and
sampling (back-translation).

All take the decoding backend the model was installed with (mtkit.inference); without one, the
model runs as trained.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from mtkit.data.vocab import BOS, EOS, PAD
from mtkit.inference import Backend
from mtkit.model import Transformer

DEFAULT = Backend()


@dataclass
class Hypothesis:
    """One finished output: token ids without BOS/EOS, and its score (beam search: the
    length-normalised log-probability; sampling: the log-probability)."""

    tokens: list[int]
    score: float


def length_penalty(length: torch.Tensor | int, alpha: float) -> torch.Tensor | float:
    """Wu et al. (2016): lp(Y) = ((5 + |Y|) / 6) ** alpha."""
    return ((5.0 + length) / 6.0) ** alpha


def _start(model: Transformer, src: torch.Tensor, backend: Backend):
    """Encode once and project the encoder keys/values once per sentence (not per hypothesis: a
    sentence's hypotheses share them, see MultiHeadAttention.attend), laid out by the backend;
    empty caches."""
    memory, mask = model.encode(src)
    cross = [backend.memory_kv(k, v) for k, v in model.cross_kv(memory)]
    return cross, mask, backend.new_cache(model)


def _max_lengths(src: torch.Tensor, offset: int, limit: int) -> torch.Tensor:
    """Section 6.1: output length limit = input length + offset (capped by the model)."""
    return ((src != PAD).sum(1) + offset).clamp(max=limit - 1)


@torch.inference_mode()
def greedy_search(model: Transformer, src: torch.Tensor, max_len_offset: int = 50,
                  backend: Backend = DEFAULT) -> list[list[int]]:
    """Most probable next token at each step; one token list per source row."""
    max_len = _max_lengths(src, max_len_offset, model.cfg.max_positions)
    batch = src.size(0)
    cross, mask, cache = _start(model, src, backend)
    tokens = torch.full((batch, 1), BOS, dtype=torch.long, device=src.device)
    done = torch.zeros(batch, dtype=torch.bool, device=src.device)
    for step in range(int(max_len.max())):
        logits = model.decode(tokens[:, -1:], cross, mask, cache, start=step)[:, -1]
        logits[:, [PAD, BOS]] = float("-inf")  # neither is ever an output
        nxt = logits.argmax(-1)
        nxt = torch.where(done, torch.full_like(nxt, PAD), nxt)
        nxt = torch.where(~done & (step + 1 >= max_len), torch.full_like(nxt, EOS), nxt)
        tokens = torch.cat([tokens, nxt[:, None]], 1)
        done |= nxt == EOS
        if bool(done.all()):
            break
    out = []
    for row in tokens[:, 1:].tolist():
        out.append(row[: row.index(EOS)] if EOS in row else row)
    return out


def sample_tokens(logits: torch.Tensor, u: torch.Tensor, top_k: int = 0, top_p: float = 1.0,
                  temperature: float = 1.0) -> torch.Tensor:
    """One token per row of `logits` (n, V), by inverse transform sampling with the uniforms `u`
    (n,) in [0, 1): temperature, then top-k, then top-p over what top-k kept."""
    scaled = logits / temperature
    V = scaled.size(-1)
    if 0 < top_k < V:
        scaled, order = scaled.topk(top_k, dim=-1)  # best first
    elif top_p < 1.0:
        scaled, order = scaled.sort(dim=-1, descending=True, stable=True)
    else:
        order = None  # all tokens, in vocabulary order
    probs = scaled.softmax(-1)
    if top_p < 1.0:  # keep the most probable tokens until their mass reaches top_p (at least one)
        cum = probs.cumsum(-1)
        drop = (cum - probs) >= top_p
        drop[:, 0] = False
        probs = probs.masked_fill(drop, 0.0)
    cum = probs.cumsum(-1)
    pick = torch.searchsorted(cum, (u.to(cum.dtype) * cum[:, -1]).unsqueeze(1), right=True).squeeze(1)
    # A uniform that rounds up to the total would fall past the end: the last token of mass then.
    last = probs.size(-1) - 1 - (probs > 0).flip(-1).int().argmax(-1)
    pick = torch.minimum(pick, last)
    return pick if order is None else order.gather(1, pick[:, None]).squeeze(1)


def uniforms(seeds: Sequence[int | Sequence[int]], steps: int) -> torch.Tensor:
    """(len(seeds), steps) float64 uniforms in [0, 1); row i is the first `steps` draws of
    numpy's default generator seeded with seeds[i], so a row's draw at step t depends on its seed
    alone, not on `steps` or the other rows."""
    return torch.from_numpy(np.stack([np.random.default_rng(s).random(steps) for s in seeds]))


@torch.inference_mode()
def sample_search(model: Transformer, src: torch.Tensor, seeds: Sequence[int | Sequence[int]],
                  max_len_offset: int = 50, backend: Backend = DEFAULT, top_k: int = 0, top_p: float = 1.0,
                  temperature: float = 1.0) -> list[Hypothesis]:
    """Each next token drawn from the model's distribution; one hypothesis per source row.

    The distribution is softmax(logits / temperature), restricted to the `top_k` most probable
    tokens (0: all), then to the most probable of those whose probability reaches `top_p`
    (nucleus; 1: all), renormalised; PAD and BOS are never drawn. Row i draws with its own
    generator, seeded with `seeds[i]` (numpy's `default_rng`, any int or sequence of ints): its
    output depends on its source, the model and its seed, not on the other rows of the batch.
    At the length limit EOS ends the row, as in greedy search.

    A hypothesis's score is the model's log-probability of its tokens and EOS, untempered and
    unfiltered (what teacher forcing gives for that output, `mtkit score`), not length-normalised.
    """
    if top_k < 0 or not 0.0 < top_p <= 1.0 or not temperature > 0.0:
        raise ValueError(f"top_k={top_k} (>= 0), top_p={top_p} (in (0, 1]), temperature={temperature} "
                         "(> 0): out of range")
    if len(seeds) != src.size(0):
        raise ValueError(f"{len(seeds)} seeds for {src.size(0)} sources")
    max_len = _max_lengths(src, max_len_offset, model.cfg.max_positions)
    batch, device = src.size(0), src.device
    steps = int(max_len.max())
    draws = uniforms(seeds, steps).to(device)
    cross, mask, cache = _start(model, src, backend)
    tokens = torch.full((batch, 1), BOS, dtype=torch.long, device=device)
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    scores = torch.zeros(batch, dtype=torch.float64, device=device)
    for step in range(steps):
        logits = model.decode(tokens[:, -1:], cross, mask, cache, start=step)[:, -1].float()
        logp = logits.log_softmax(-1)  # the model's own distribution, for the score
        logits[:, [PAD, BOS]] = float("-inf")
        nxt = sample_tokens(logits, draws[:, step], top_k, top_p, temperature)
        nxt = torch.where(~done & (step + 1 >= max_len), torch.full_like(nxt, EOS), nxt)
        scores += logp.gather(1, nxt[:, None]).squeeze(1).double().masked_fill(done, 0.0)
        nxt = torch.where(done, torch.full_like(nxt, PAD), nxt)
        tokens = torch.cat([tokens, nxt[:, None]], 1)
        done |= nxt == EOS
        if bool(done.all()):
            break
    out = []
    for row, score in zip(tokens[:, 1:].tolist(), scores.tolist()):
        out.append(Hypothesis(row[: row.index(EOS)] if EOS in row else row, score))
    return out


@torch.inference_mode()
def beam_search(model: Transformer, src: torch.Tensor, beam_size: int = 4, alpha: float = 0.6,
                max_len_offset: int = 50, nbest: int = 1, early_exit: bool = False,
                stopping: str = "finished", backend: Backend = DEFAULT) -> list[list[Hypothesis]]:
    """Batched beam search; the beams of all sentences live in one (B * K) batch.

    A hypothesis ends when EOS is among the top K of the 2K candidates of a step (fairseq's rule);
    its score is its log-probability divided by `length_penalty`. When a sentence is done:
    - stopping "finished" (fairseq, CTranslate2 with a length penalty): once K hypotheses ended;
    - stopping "bound" (the paper's early termination, as in tensor2tensor): once it has `nbest`
      ended hypotheses and no live one can still beat the nbest-th best of them: the best live
      log-probability (it only falls) divided by the length penalty at the sentence's length
      limit (the largest it can be) is no higher;
    - with `early_exit` (CTranslate2's rule without length penalty) also, once it has `nbest`
      hypotheses, when the best candidate of a step is EOS.
    Finished sentences leave the batch. K = 1 is greedy search.
    """
    if stopping not in ("finished", "bound"):
        raise ValueError(f"stopping={stopping!r}: expected 'finished' or 'bound'")
    B, K, device = src.size(0), beam_size, src.device
    limits = _max_lengths(src, max_len_offset, model.cfg.max_positions).tolist()  # per sentence
    cross, mask, cache = _start(model, src, backend)
    alive = list(range(B))  # the sentence of each row group; bookkeeping in Python, not per-step ops
    # All beams of a sentence start identical, so the first step runs one row per sentence and
    # its best K continuations become the K beams.
    tokens = torch.full((B, 1), BOS, dtype=torch.long, device=device)
    scores = torch.zeros(B, 1, device=device)
    finished: list[list[Hypothesis]] = [[] for _ in range(B)]
    for step in range(max(limits)):
        width = scores.size(1)  # rows per sentence: 1 at the first step, then K
        logits = model.decode(tokens[:, -1:], cross, mask, cache, start=step, group=width)[:, -1]
        logp = logits.float().log_softmax(-1)
        n, V = scores.size(0), logp.size(-1)
        logp[:, [PAD, BOS]] = float("-inf")  # neither is ever an output
        ended = {r for r, s in enumerate(alive) if step + 1 >= limits[s]}  # all a sentence can end
        if ended:
            # At the limit only EOS may follow, finite even where the model rules it out, so every
            # sentence ends with hypotheses (a model that never emits EOS still gets its line).
            at_limit = torch.tensor([r in ended for r in range(n)], device=device).repeat_interleave(width)
            logp[at_limit] = torch.where(torch.arange(V, device=device) == EOS,
                                         logp[at_limit].clamp(min=-1e4), float("-inf"))
        top_scores, top_idx = backend.best_candidates(logp, scores, 2 * K)  # (n, 2K)
        beam_idx, tok_idx = top_idx // V, top_idx % V
        is_eos = (tok_idx == EOS) & torch.isfinite(top_scores)
        eos_top = is_eos[:, :K]
        hit_rows: set[int] = set()
        best_ended: set[int] = set()
        if bool(eos_top.any()):
            lp = length_penalty(step + 1, alpha)
            hits = eos_top.nonzero().tolist()
            beams, ends = beam_idx[:, :K].tolist(), top_scores[:, :K].tolist()  # to Python once per step
            rows = torch.tensor([r * width + beams[r][c] for r, c in hits], device=device)
            for (r, c), row in zip(hits, tokens[:, 1:].index_select(0, rows).tolist()):
                found = finished[alive[r]]
                if stopping == "bound" or len(found) < K:
                    found.append(Hypothesis(row, ends[r][c] / lp))
            hit_rows = {r for r, _ in hits}
            best_ended = {r for r, c in hits if c == 0}
        # Continue with the best K candidates that did not end.
        cont_scores = top_scores.masked_fill(is_eos, float("-inf"))
        scores, pick = cont_scores.topk(K, dim=1)  # (n, K)
        live = scores[:, 0].tolist() if stopping == "bound" else None  # each sentence's best live score
        for r in range(n) if stopping == "bound" else hit_rows:
            found = finished[alive[r]]
            if stopping == "finished" and len(found) >= K:
                ended.add(r)
            elif early_exit and r in best_ended and len(found) >= nbest:
                ended.add(r)
            elif stopping == "bound" and len(found) >= nbest and r not in ended:
                found.sort(key=lambda h: -h.score)
                del found[K:]
                best_live = live[r] / length_penalty(limits[alive[r]], alpha)
                if found[nbest - 1].score >= best_live:
                    ended.add(r)
        src_rows = (beam_idx.gather(1, pick) + torch.arange(n, device=device)[:, None] * width).view(-1)
        tokens = torch.cat([tokens.index_select(0, src_rows), tok_idx.gather(1, pick).view(-1, 1)], 1)
        if ended:  # finished sentences leave the batch
            keep = [r for r in range(n) if r not in ended]
            if not keep:
                break
            kept = torch.tensor(keep, device=device)
            rows = (kept[:, None] * K + torch.arange(K, device=device)).view(-1)
            src_rows, tokens = src_rows.index_select(0, rows), tokens.index_select(0, rows)
            scores = scores.index_select(0, kept)
            cross = [backend.keep_rows(k, v, kept) for k, v in cross]
            mask = mask.index_select(0, kept)
            alive = [alive[r] for r in keep]
        for layer in cache:  # each surviving hypothesis takes the cache rows it came from
            layer.reorder(src_rows)
    # A model whose scores are not numbers (NaN) ends no hypothesis: its sentences get an empty one.
    return [sorted(h, key=lambda x: -x.score)[:nbest] or [Hypothesis([], float("-inf"))] for h in finished]
