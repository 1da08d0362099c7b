"""Lines in -> subwords -> length-sorted batches -> search -> lines out, in input order.

`Translator` is also the Python API: load a model once, translate lists of strings, or stream an
endless iterable of lines through a bounded window.
"""

from __future__ import annotations

import atexit
import ctypes
import logging
import multiprocessing
import re
import sys
import time
import warnings
from collections.abc import Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, replace
from itertools import islice
from pathlib import Path
from typing import Literal, TextIO

import torch
from torch import nn

from mtkit.checkpoint import load_checkpoint, resolve_model
from mtkit.config import DecodeConfig, config_from_dict
from mtkit.data.batching import pad, token_batches
from mtkit.data.corpus import normalize
from mtkit.data.vocab import Vocab
from mtkit.device import Precision, decode_precision, pick_device
from mtkit.errors import UserError
from mtkit.io import atomic_file
from mtkit.model import BOS, EOS, FeedForward, Transformer
from mtkit.search import Hypothesis, beam_search, greedy_search

log = logging.getLogger("mtkit")

# Where an overlong line may be cut: after sentence-internal punctuation followed by a space.
CUT_POINTS = re.compile(r"(?<=[.!?;:,。！？；])\s+")


class PackedLinear(nn.Module):
    """nn.Linear for CPU inference, its weight reordered once into oneDNN's blocked layout; takes
    and returns ordinary tensors (the packed matmul that torch.compile's CPU backend uses)."""

    def __init__(self, linear: nn.Linear, activation: str = "none", batch_hint: int = 256):
        super().__init__()
        self.activation = activation  # oneDNN post-op: "none" or "relu"
        self.register_buffer("weight", torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), batch_hint))
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, self.activation, [], "")


def _pack_linears(module: nn.Module) -> None:
    for name, child in module.named_children():
        if isinstance(child, FeedForward):  # ReLU as the first layer's post-op
            child.w1, child.act = PackedLinear(child.w1, "relu"), nn.Identity()
        if isinstance(child, nn.Linear):
            setattr(module, name, PackedLinear(child))
        else:
            _pack_linears(child)


def _fuse_qkv(model: Transformer) -> None:
    """Self-attention's three projections of the same input as one (D -> 3D) layer: one matmul."""
    for attn in [*(layer.attn for layer in model.encoder), *(layer.self_attn for layer in model.decoder)]:
        fused = nn.Linear(attn.q.in_features, 3 * attn.q.out_features)
        with torch.no_grad():
            fused.weight.copy_(torch.cat([attn.q.weight, attn.k.weight, attn.v.weight]))
            fused.bias.copy_(torch.cat([attn.q.bias, attn.k.bias, attn.v.bias]))
        attn.qkv, attn.q, attn.k, attn.v = fused, None, None, None


def for_cpu_inference(model: Transformer, quantize: Literal["int8"] | None) -> Transformer:
    """Repack a model for CPU decoding: the output projection as a module of its own, self-attention's
    q, k, v as one layer, then every linear layer dynamically quantised to int8 (weights per output
    channel), or (fp32) with its weight in oneDNN's blocked layout and the feed-forward ReLU as its
    post-op, which decodes faster here with the same output."""
    model.output = nn.Linear(model.cfg.d_model, model.tgt_embed.tokens.num_embeddings, bias=False)
    model.output.weight = model.tgt_embed.tokens.weight
    _fuse_qkv(model)
    if quantize == "int8":
        with warnings.catch_warnings():  # torch.ao.quantization is deprecated in favour of torchao
            warnings.simplefilter("ignore")
            quant = torch.ao.quantization
            return quant.quantize_dynamic(model, {nn.Linear: quant.per_channel_dynamic_qconfig}, dtype=torch.qint8)
    if torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise"):
        _pack_linears(model)
    return model


def keep_freed_memory() -> None:
    """Ask glibc to keep freed memory for reuse (process-wide; Linux glibc only, else nothing).

    CPU decoding allocates multi-megabyte tensors every step (logits, key/value caches). By default
    glibc maps such blocks afresh and unmaps or trims them when freed, so each step page-faults its
    memory in again; here that cost more than the copies themselves. Blocks up to 32 MB now come
    from the heap, and up to 1 GB of free heap stays mapped.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3  # <malloc.h>
    libc.mallopt(m_mmap_threshold, 32 << 20)
    libc.mallopt(m_trim_threshold, 1 << 30)
    libc.mallopt(m_top_pad, 64 << 20)


_FORKED: Translator | None = None
"""In a worker process: the translator it decodes with, inherited when forked (not pickled)."""


def _start_worker(translator: Translator) -> None:
    """A worker process's start: one thread (GNU OpenMP's thread pool does not survive a fork; a
    single thread never enters it), and the translator it inherited."""
    global _FORKED
    torch.set_num_threads(1)
    _FORKED = translator


def _search_forked(job: tuple[list[list[int]], int]) -> list[list[Hypothesis]]:
    """A worker process's task: one batch of sources, its n-best lists."""
    sources, nbest = job
    return _FORKED._search_batch(sources, nbest)


@dataclass
class Translation:
    """One input line's result: n-best (text, score) pairs, and its subwords for attention output."""

    nbest: list[tuple[str, float]]
    src_ids: list[int]
    tgt_ids: list[int]


class Translator:
    """A loaded model with its vocabulary and decoding settings."""

    def __init__(self, model: Transformer, vocab: Vocab, decode: DecodeConfig, device: torch.device,
                 workers: int = 1, precision: Precision | None = None):
        self.model, self.vocab, self.decode, self.device = model.eval(), vocab, decode, device
        # CPU decoding is fp32 (its packed and int8 paths); on CUDA bf16, or fp16 where bf16 is missing
        self.precision = precision or decode_precision(device)
        self.workers, self._pool = workers, None
        if workers < 1:
            raise UserError(f"workers {workers}: expected 1 or more")
        if workers > 1:
            if device.type != "cpu":
                raise UserError(f"workers {workers}: worker processes are for CPU decoding")
            if "fork" not in multiprocessing.get_all_start_methods():
                raise UserError(f"workers {workers}: worker processes need fork(), which this platform lacks")
            if multiprocessing.current_process().daemon:
                raise UserError(f"workers {workers}: a daemonic process cannot start worker processes")

    @classmethod
    def load(cls, path: str | Path, device: str = "auto", quantize: Literal["int8"] | None = None,
             workers: int = 1, **overrides) -> "Translator":
        """From a checkpoint file or run directory; `overrides` replace DecodeConfig fields.

        `workers` > 1 (CPU): that many batches decode at once, each in a forked process of its own
        with one thread (CTranslate2's inter_threads); in fp32 the output is unchanged.
        """
        ckpt = resolve_model(path)
        state = load_checkpoint(ckpt)
        cfg = config_from_dict(state["config"], str(ckpt))
        try:
            vocab = Vocab.from_state(state["vocab"])
        except (ValueError, KeyError, TypeError) as exc:
            raise UserError(f"{ckpt}: its vocabulary cannot be loaded ({exc})") from None
        model = Transformer(cfg.model, vocab.src_size, vocab.tgt_size)
        try:
            model.load_state_dict(state["model"])
        except (RuntimeError, TypeError, AttributeError) as exc:
            first = str(exc).strip().splitlines()
            raise UserError(f"{ckpt}: its weights do not fit the model its config describes "
                            f"({(first[-1] if first else type(exc).__name__).strip()[:160]})") from None
        dev = pick_device(device)
        if quantize == "int8" and dev.type != "cpu":
            raise UserError("--quantize int8 is for CPU decoding; on CUDA mtkit decodes in bf16 or fp16")
        if dev.type == "cpu":
            model = for_cpu_inference(model.eval(), quantize)
            keep_freed_memory()
        decode = replace(cfg.decode, **{k: v for k, v in overrides.items() if v is not None})
        log.info("loaded %s (step %s) on %s%s", ckpt, state.get("step"), dev, ", int8" if quantize else "")
        return cls(model.to(dev), vocab, decode, dev, workers)

    @property
    def source_limit(self) -> int:
        """Longest source (subwords, EOS excluded) the model reads with room for its output."""
        return max(self.model.cfg.max_positions - 1 - self.decode.max_len_offset, 1)

    def _pieces(self, text: str, ids: list[int]) -> list[list[int]]:
        """A line as the sources the model reads: whole, or cut at punctuation, else at the limit."""
        limit = self.source_limit
        if len(ids) <= limit:
            return [ids]
        parts: list[list[int]] = []
        for segment in self.vocab.encode_src(CUT_POINTS.split(text)):
            if parts and len(parts[-1]) + len(segment) <= limit:
                parts[-1] = parts[-1] + segment  # join short segments back up to the limit
            else:
                parts.extend(segment[i : i + limit] for i in range(0, len(segment), limit))
        return parts

    def _search(self, src: torch.Tensor, nbest: int) -> list[list[Hypothesis]]:
        d = self.decode
        dtype = self.precision.dtype if self.device.type == "cuda" else None
        with torch.autocast(self.device.type, dtype=dtype, enabled=dtype is not None):
            if d.beam_size == 1 and nbest == 1:
                return [[Hypothesis(t, 0.0)] for t in greedy_search(self.model, src, d.max_len_offset)]
            return beam_search(self.model, src, d.beam_size, d.length_penalty, d.max_len_offset, nbest,
                               d.early_exit)

    def _search_batch(self, sources: list[list[int]], nbest: int) -> list[list[Hypothesis]]:
        return self._search(pad(sources, suffix=EOS).to(self.device), nbest)

    def _search_all(self, batches: list[list[list[int]]], nbest: int) -> Iterator[list[list[Hypothesis]]]:
        """Each batch's n-best lists, in order: here, or spread over the worker processes."""
        if self.workers == 1 or len(batches) <= 1:
            for sources in batches:
                yield self._search_batch(sources, nbest)
            return
        if self._pool is None:  # forked on first use: the workers inherit the loaded model
            self._pool = ProcessPoolExecutor(self.workers, multiprocessing.get_context("fork"),
                                             initializer=_start_worker, initargs=(self,))
            atexit.register(self.close)  # before interpreter teardown, which the pool's threads outlive
        try:
            yield from self._pool.map(_search_forked, [(sources, nbest) for sources in batches])
        except BrokenProcessPool:  # a worker died (killed, out of memory): the next call starts afresh
            self.close()
            raise UserError(f"a decoding worker process died (killed, or out of memory) with {self.workers} "
                            "--workers; nothing after the lines already written was translated") from None

    def close(self) -> None:
        """Stop the worker processes, if any were started, whatever state they are in: those that
        do not end on the pool's request within seconds (one killed while holding the task queue's
        lock leaves the others waiting on it for ever) are terminated."""
        if self._pool is None:
            return
        pool, self._pool = self._pool, None
        atexit.unregister(self.close)
        processes = list((getattr(pool, "_processes", None) or {}).values())  # the pool's own handles
        pool.shutdown(wait=False, cancel_futures=True)
        deadline = time.monotonic() + 3.0
        for process in processes:
            process.join(max(deadline - time.monotonic(), 0.0))
            if process.is_alive():
                process.kill()
                process.join(1.0)

    def run(self, lines: list[str], nbest: int = 1) -> list[Translation]:
        """Translate a list of lines (sorted by length into token-budget batches), in input order."""
        if nbest > self.decode.beam_size:
            raise ValueError(f"nbest ({nbest}) cannot exceed the beam size ({self.decode.beam_size})")
        texts = [normalize(line) for line in lines]
        sources, owner = [], []  # every piece of every non-empty line, and its line
        for i, ids in enumerate(self.vocab.encode_src(texts)):
            if not texts[i]:
                continue  # an empty line translates to an empty line
            parts = self._pieces(texts[i], ids)
            if len(parts) > 1:
                log.warning("line %d: %d subwords exceed the model's limit of %d; translating %d pieces",
                            i + 1, len(ids), self.source_limit, len(parts))
            sources.extend(parts)
            owner.extend([i] * len(parts))
        found: list[list[Hypothesis]] = [[] for _ in sources]
        lengths = [len(s) for s in sources]
        budget = max(1, self.decode.max_tokens // self.decode.beam_size)
        batches = token_batches(lengths, lengths, budget)
        if self.workers > 1 and len(batches) % self.workers:
            # Workers idle in the last round: a smaller budget that fills it, if there is one
            rounds = -(-len(batches) // self.workers)
            fuller = token_batches(lengths, lengths, max(1, budget * len(batches) // (rounds * self.workers)))
            if len(fuller) == rounds * self.workers:
                batches = fuller
        for batch, results in zip(batches, self._search_all([[sources[j] for j in b] for b in batches], nbest)):
            for j, hyps in zip(batch, results):
                found[j] = hyps
        return self._join(len(lines), sources, owner, found)

    def _join(self, n_lines: int, sources: list, owner: list[int], found: list) -> list[Translation]:
        """Per line: its n-best list, or the best of each piece joined with spaces."""
        out = [Translation([("", 0.0)], [], []) for _ in range(n_lines)]
        pieces: dict[int, list[int]] = {}
        for j, i in enumerate(owner):
            pieces.setdefault(i, []).append(j)
        # What each line shows: its n-best list, or the best of each of its pieces; decoded in one
        # batch call (SentencePiece's list decoding starts a thread pool per call, ~80 us).
        shown = {i: found[js[0]] if len(js) == 1 else [found[j][0] for j in js] for i, js in pieces.items()}
        texts = iter(self.vocab.decode_tgt([h.tokens for hyps in shown.values() for h in hyps]))
        for i, js in pieces.items():
            hyps, src_ids = shown[i], [t for j in js for t in sources[j]]
            decoded = [next(texts) for _ in hyps]
            if len(js) == 1:
                out[i] = Translation(list(zip(decoded, [h.score for h in hyps])), src_ids, hyps[0].tokens)
            else:
                out[i] = Translation([(" ".join(decoded), sum(h.score for h in hyps))], src_ids,
                                     [t for h in hyps for t in h.tokens])
        return out

    def translate_nbest(self, lines: list[str], nbest: int = 1) -> list[list[tuple[str, float]]]:
        """Up to `nbest` (translation, score) pairs per input line, in input order."""
        return [t.nbest for t in self.run(lines, nbest)]

    def translate(self, lines: list[str]) -> list[str]:
        """One translation per input line, in input order; empty lines stay empty."""
        return [t.nbest[0][0] for t in self.run(lines, 1)]

    def stream(self, lines: Iterable[str], window: int = 1000, nbest: int = 1) -> Iterator[Translation]:
        """Translate an iterable of any length `window` lines at a time: output starts after the
        first window, memory stays bounded, and order is kept."""
        it = iter(lines)
        while chunk := list(islice(it, window)):
            yield from self.run(chunk, nbest)

    @torch.no_grad()
    def cross_attention(self, src_ids: list[int], tgt_ids: list[int], layer: int = -1,
                        head: int | None = None) -> torch.Tensor:
        """Encoder-decoder attention (T + 1, S + 1) of one translation (EOS on both sides):
        teacher-forced, of one decoder layer, averaged over heads unless `head` is given."""
        src = torch.tensor([src_ids + [EOS]], device=self.device)
        tgt_in = torch.tensor([[BOS] + tgt_ids], device=self.device)
        module = self.model.decoder[layer].cross_attn
        seen = {}
        hook = module.register_forward_hook(lambda m, args, out: seen.update(w=m.weights(*args)))
        try:
            self.model(src, tgt_in)
        finally:
            hook.remove()
        weights = seen["w"][0]  # (H, T + 1, S + 1)
        return (weights.mean(0) if head is None else weights[head]).float().cpu()


@dataclass
class Outputs:
    """Where `translate_to` writes: translations (stdout when None), n-best size, the streaming
    window, and optional attention pictures and hard alignments."""

    output: Path | None = None
    nbest: int = 1
    window: int = 1000
    attention_dir: Path | None = None
    alignment: Path | None = None
    layer: int = -1
    head: int | None = None


@contextmanager
def _atomic_text(path: Path | None) -> Iterator[TextIO]:
    """stdout as is; a file written whole or not at all (`mtkit.io.atomic_file`)."""
    if path is None or str(path) == "-":
        yield sys.stdout
        sys.stdout.flush()
        return
    with atomic_file(path) as f:
        yield f


def translate_to(translator: Translator, lines: Iterable[str], out: Outputs) -> int:
    """Stream `lines` through the translator into `out`, window by window; returns the line count."""
    from mtkit.attention import hard_alignment, pharaoh, save_heatmap

    if out.attention_dir is not None:
        out.attention_dir.mkdir(parents=True, exist_ok=True)
    count = 0
    with _atomic_text(out.output) as text, ExitStack() as stack:
        align = stack.enter_context(_atomic_text(out.alignment)) if out.alignment else None
        for result in translator.stream(lines, out.window, out.nbest):
            count += 1
            if out.nbest == 1:
                text.write(result.nbest[0][0] + "\n")
            else:
                text.writelines(f"{count - 1} ||| {t} ||| {s:.4f}\n" for t, s in result.nbest)
            if count % out.window == 0:  # a window's lines leave at once (a person at a terminal, a pipe)
                text.flush()
            if align is None and out.attention_dir is None:
                continue
            if len(result.src_ids) > translator.source_limit:  # translated in pieces: no one picture
                log.warning("line %d: translated in pieces; no attention picture or alignment", count)
                if align is not None:
                    align.write("\n")
                continue
            weights = translator.cross_attention(result.src_ids, result.tgt_ids, out.layer, out.head)
            if align is not None:
                align.write(pharaoh(hard_alignment(weights)) + "\n")
            if out.attention_dir is not None and result.src_ids:
                save_heatmap(weights, translator.vocab.src_pieces_of(result.src_ids),
                             translator.vocab.tgt_pieces_of(result.tgt_ids),
                             out.attention_dir / f"{count:06d}.png", f"line {count}: {result.nbest[0][0]}")
    return count
