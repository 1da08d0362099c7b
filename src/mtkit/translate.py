"""Lines in -> subwords -> length-sorted batches -> search -> lines out, in input order; and the
model's log-probability of given translations (`score_pairs`, teacher-forced).

`Translator` is also the Python API: load a model once, translate lists of strings, or stream an
endless iterable of lines through a bounded window. Use it in a `with` block (or call `close`)
when it decodes with worker processes.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from dataclasses import replace
from itertools import islice
from pathlib import Path

import torch

from mtkit import inference
from mtkit.attention import attention_maps, attention_record, heads_of
from mtkit.checkpoint import load_checkpoint, resolve_model
from mtkit.config import DecodeConfig, RunConfig, config_from_dict
from mtkit.data.batching import collate, pad, token_batches
from mtkit.data.corpus import normalize
from mtkit.data.vocab import EOS, PAD, Vocab
from mtkit.device import Precision, decode_precision, pick_device
from mtkit.errors import UserError
from mtkit.inference.workers import WorkerPool, check_workers
from mtkit.lines import Job, Translation, source_limit, translate_lines
from mtkit.model import Transformer
from mtkit.search import Hypothesis, beam_search, greedy_search, sample_search

__all__ = ["Translation", "Translator", "load_model", "score_pairs"]

log = logging.getLogger("mtkit")


def load_model(path: str | Path) -> tuple[Transformer, Vocab, RunConfig, dict]:
    """The model of a checkpoint file or run directory, its vocabulary, config and raw state."""
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
    log.info("loaded %s (step %s)", ckpt, state.get("step"))
    return model, vocab, cfg, state


def prefix_ids(vocab: Vocab, prefix: str | None) -> list[int]:
    """The ids put in front of every source: the tag `prefix`'s id, or none."""
    if prefix is None:
        return []
    try:
        return [vocab.tag_id(prefix)]
    except UserError as exc:
        raise UserError(f"--prefix/decode.prefix: {exc}") from None


class Translator:
    """A model with its vocabulary, search settings and decoding backend (mtkit.inference); owns
    the worker processes it starts (`workers` > 1, CPU) until `close` or the end of a `with`.

    With `decode.prefix` every source starts with that tag. With `decode.sample` each line's
    translation is drawn (`sample_search`) with a generator seeded by (decode.seed, the line's
    index in the input, the piece of the line): the output of a line depends on the seed, the
    model, the line and its position, never on the batches, window or workers it is decoded with.
    """

    def __init__(self, model: Transformer, vocab: Vocab, decode: DecodeConfig, device: torch.device,
                 workers: int = 1, precision: Precision | None = None,
                 backend: inference.Backend | None = None):
        check_workers(workers, device)
        self.model, self.vocab, self.decode, self.device = model.eval(), vocab, decode, device
        self.backend = backend or inference.Backend()
        # CPU decoding is fp32; on CUDA bf16, or fp16 where bf16 is missing
        self.precision = precision or decode_precision(device)
        self.workers = workers
        self.prefix = prefix_ids(vocab, decode.prefix)
        self._pool = WorkerPool(workers, self._search) if workers > 1 else None
        self.languages: dict[str, str] = {}  # source and target language, when loaded from a checkpoint

    @classmethod
    def load(cls, path: str | Path, device: str = "auto", quantize: str | None = None, workers: int = 1,
             **overrides) -> Translator:
        """From a checkpoint file or run directory, installed for `device` (mtkit.inference.install);
        `overrides` replace DecodeConfig fields; `workers` > 1 (CPU): that many batches decode at
        once, each in a forked process with one thread."""
        model, vocab, cfg, _ = load_model(path)
        dev = pick_device(device)
        if quantize == "int8" and dev.type != "cpu":
            raise UserError("--quantize int8 is for CPU decoding; on CUDA mtkit decodes in bf16 or fp16")
        backend = inference.install(model.to(dev), dev, quantize)
        decode = replace(cfg.decode, **{k: v for k, v in overrides.items() if v is not None})
        translator = cls(model, vocab, decode, dev, workers, backend=backend)
        translator.languages = {"src_lang": cfg.data.src_lang, "tgt_lang": cfg.data.tgt_lang}
        return translator

    def __enter__(self) -> Translator:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Stop the worker processes, if any were started."""
        if self._pool is not None:
            self._pool.close()

    @property
    def source_limit(self) -> int:
        """Longest source (subwords, the prefix tag included, EOS excluded) the model reads with
        room for its output."""
        return source_limit(self.model.cfg.max_positions, self.decode.max_len_offset, len(self.prefix))

    def _search(self, job: Job) -> list[list[Hypothesis]]:
        """One batch of sources (with each one's seed when sampling): its n-best lists."""
        sources, nbest, seeds = job
        src, d = pad(sources, suffix=EOS).to(self.device), self.decode
        dtype = self.precision.dtype if self.device.type == "cuda" else None
        with torch.autocast(self.device.type, dtype=dtype, enabled=dtype is not None):
            if d.sample:
                hyps = sample_search(self.model, src, seeds, d.max_len_offset, self.backend, d.top_k, d.top_p,
                                     d.temperature)
                return [[h] for h in hyps]
            if d.beam_size == 1 and nbest == 1:
                tokens = greedy_search(self.model, src, d.max_len_offset, self.backend)
                return [[Hypothesis(t, 0.0)] for t in tokens]
            return beam_search(self.model, src, d.beam_size, d.length_penalty, d.max_len_offset, nbest,
                               d.early_exit, d.stopping, self.backend)

    def run(self, lines: list[str], nbest: int = 1, first: int = 0) -> list[Translation]:
        """Translate a list of lines (sorted by length into token-budget batches), in input order;
        `first`: the index of lines[0] in the whole input (it seeds the sampling of each line)."""
        d = self.decode
        if d.sample and nbest != 1:
            raise ValueError(f"nbest ({nbest}): sampling draws one translation per line")
        if not d.sample and nbest > d.beam_size:
            raise ValueError(f"nbest ({nbest}) cannot exceed the beam size ({d.beam_size})")
        width = 1 if d.sample else d.beam_size

        def mapper(search, jobs):
            return map(search, jobs) if self._pool is None or len(jobs) <= 1 else self._pool.map(jobs)

        return translate_lines(self.vocab, lines, self._search, self.source_limit, d.max_tokens // width,
                               self.prefix, nbest, first, d.seed if d.sample else None, self.workers, mapper)

    def translate_nbest(self, lines: list[str], nbest: int = 1) -> list[list[tuple[str, float]]]:
        """Up to `nbest` (translation, score) pairs per input line, in input order."""
        return [t.nbest for t in self.run(lines, nbest)]

    def translate(self, lines: list[str]) -> list[str]:
        """One translation per input line, in input order; empty lines stay empty."""
        return [t.nbest[0][0] for t in self.run(lines, 1)]

    def stream(self, lines: Iterable[str], window: int = 1000, nbest: int = 1) -> Iterator[Translation]:
        """Translate an iterable of any length `window` lines at a time: output starts after the
        first window, memory stays bounded, and order is kept."""
        it, first = iter(lines), 0
        while chunk := list(islice(it, window)):
            yield from self.run(chunk, nbest, first)
            first += len(chunk)

    def cross_attention(self, src_ids: list[int], tgt_ids: list[int], layer: int = -1,
                        head: int | None = None) -> torch.Tensor:
        """Encoder-decoder attention (T + 1, S + 1) of one translation (EOS on both sides):
        teacher-forced, of one decoder layer, averaged over heads unless `head` is given."""
        return heads_of(attention_maps(self.model, src_ids, tgt_ids)["cross"][layer], head)

    def attention(self, translation: Translation, maps: list[dict] | None = None) -> list[dict]:
        """Every attention weight (all layers and heads of the three kinds) of a translation, as
        JSON records (`attention_record`), one per piece the line was translated in (`maps`: their
        `attention_maps`, when already computed); none for an empty line."""
        if maps is None:
            maps = [attention_maps(self.model, src, tgt) for src, tgt in translation.parts]
        return [attention_record(m, self.vocab.src_pieces_of(src), self.vocab.tgt_pieces_of(tgt))
                for m, (src, tgt) in zip(maps, translation.parts)]


@torch.no_grad()
def score_pairs(model: Transformer, vocab: Vocab, sources: list[str], references: list[str],
                device: torch.device, max_tokens: int = 8000, prefix: str | None = None,
                per_token: bool = False, names: tuple[str, str] = ("source", "reference")) -> list[float]:
    """The model's log-probability of each reference given its source, teacher-forced as in
    training (`collate`, the model's forward, no label smoothing), in fp32 and eval mode: the sum
    of log p over the reference's subwords and EOS, divided by their number with `per_token`.
    Pairs go in token-budget batches (`token_batches`); the result is in input order. Lines are
    whitespace-normalised as for translation; an empty line is scored too (an empty reference is
    EOS alone). A pair longer than the model's positions is a UserError naming its line (`names`:
    the two inputs)."""
    if len(sources) != len(references):
        raise ValueError(f"{len(sources)} sources for {len(references)} references")
    model.eval()
    tag = prefix_ids(vocab, prefix)
    src_ids = [tag + ids for ids in vocab.encode_src([normalize(line) for line in sources])]
    tgt_ids = vocab.encode_tgt([normalize(line) for line in references])
    limit = model.cfg.max_positions
    for i, (s, t) in enumerate(zip(src_ids, tgt_ids)):
        for name, ids in zip(names, (s, t)):
            if len(ids) + 1 > limit:
                raise UserError(f"{name}:{i + 1}: {len(ids) + 1} subwords with EOS exceed the model's "
                                f"{limit} positions (model.max_positions)")
    out = [0.0] * len(sources)
    for idx in token_batches([len(s) for s in src_ids], [len(t) for t in tgt_ids], max_tokens):
        idx = idx.tolist()
        batch = collate([src_ids[i] for i in idx], [tgt_ids[i] for i in idx])
        batch = {k: v.to(device) for k, v in batch.items()}
        logits = model(batch["src"], batch["tgt_in"]).float()
        target = batch["tgt_out"]
        logp = logits.log_softmax(-1).gather(2, target[..., None]).squeeze(2).masked_fill(target == PAD, 0.0)
        sums = logp.double().sum(1)
        if per_token:
            sums = sums / (target != PAD).sum(1)
        for i, value in zip(idx, sums.tolist()):
            out[i] = value
    return out
