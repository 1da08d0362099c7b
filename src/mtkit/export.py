"""Export to CTranslate2: an mtkit checkpoint -> a self-contained CTranslate2 model directory
(model.bin, config.json, vocabularies, the SentencePiece model(s), mtkit_export.json), and
`ct2_translate`, which translates lines with such a directory the way `mtkit translate` does.

Decoding differences from mtkit's own search (search.py), by design of CTranslate2:
- length penalty: CTranslate2 divides a beam score by length ** alpha; mtkit by Wu et al.'s
  ((5 + length) / 6) ** alpha (search.length_penalty). Greedy search (beam 1) is unaffected.
- length limit: CTranslate2's max_decoding_length is one number per batch; mtkit's is per
  sentence, source length + decode.max_len_offset. `ct2_translate` passes the batch's largest
  limit and cuts each output to its sentence's limit: exact for greedy search, close for beam.
- beam search: both end a sentence once beam_size hypotheses have finished, but the candidates
  kept per step differ in detail, so beam outputs may differ where scores nearly tie.
Lines go through mtkit's own line pipeline (mtkit.lines): the same order, empty lines, long lines
in pieces and token-budget batches as `mtkit translate`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mtkit.checkpoint import load_checkpoint, resolve_model
from mtkit.config import DecodeConfig, config_from_dict
from mtkit.data.vocab import BOS, EOS, PAD, UNK, Subwords, Vocab
from mtkit.errors import UserError
from mtkit.io import atomic_dir
from mtkit.lines import Job, Translation, output_steps, source_limit, translate_lines
from mtkit.model import sinusoids
from mtkit.search import Hypothesis
from mtkit.translate import prefix_ids

INSTALL = 'pip install "mtkit[ct2]"'
LAYER_NORM_EPS = 1e-5  # torch.nn.LayerNorm's default, which model.py uses
# The special ids under the names CTranslate2's config expects (PAD only for suppressing it).
SPECIALS = {PAD: "<pad>", UNK: "<unk>", BOS: "<s>", EOS: "</s>"}
SOURCE_SPM, TARGET_SPM, INFO = "source.spm", "target.spm", "mtkit_export.json"
# Everything an export writes; only these are replaced when `force` overwrites a directory.
EXPORT_FILES = ("model.bin", "config.json", "shared_vocabulary.json", "source_vocabulary.json",
                "target_vocabulary.json", SOURCE_SPM, TARGET_SPM, INFO, "README.md")


def _ctranslate2() -> Any:
    """The ctranslate2 module, or a UserError that says how to install it."""
    try:
        import ctranslate2
    except ImportError:
        raise UserError("exporting to or translating with CTranslate2 needs ctranslate2: "
                        f"{INSTALL}") from None
    return ctranslate2


def _array(t: torch.Tensor) -> np.ndarray:
    return t.detach().float().cpu().numpy()


def _linear(spec: Any, weights: dict, name: str) -> None:
    """nn.Linear `name` -> a CTranslate2 LinearSpec (same (out, in) layout)."""
    spec.weight, spec.bias = _array(weights[f"{name}.weight"]), _array(weights[f"{name}.bias"])


def _fused(spec: Any, weights: dict, names: list[str]) -> None:
    """Several nn.Linear stacked along the output dimension: CTranslate2's fused q|k|v or k|v."""
    spec.weight = np.concatenate([_array(weights[f"{n}.weight"]) for n in names])
    spec.bias = np.concatenate([_array(weights[f"{n}.bias"]) for n in names])


def _norm(spec: Any, weights: dict, name: str) -> None:
    spec.gamma, spec.beta = _array(weights[f"{name}.weight"]), _array(weights[f"{name}.bias"])


def _attention(spec: Any, weights: dict, name: str, self_attention: bool) -> None:
    """Self-attention: linear = [q|k|v, out]; cross-attention: linear = [q, k|v, out]."""
    if self_attention:
        _fused(spec.linear[0], weights, [f"{name}.q", f"{name}.k", f"{name}.v"])
    else:
        _linear(spec.linear[0], weights, f"{name}.q")
        _fused(spec.linear[1], weights, [f"{name}.k", f"{name}.v"])
    _linear(spec.linear[-1], weights, f"{name}.out")


def _ffn(spec: Any, weights: dict, name: str, norm: str) -> None:
    _linear(spec.linear_0, weights, f"{name}.w1")
    _linear(spec.linear_1, weights, f"{name}.w2")
    _norm(spec.layer_norm, weights, norm)


def _fill(spec: Any, weights: dict, positions: np.ndarray, pre_norm: bool) -> None:
    """Copy mtkit's weights into the TransformerSpec.

    Each CTranslate2 sublayer owns one LayerNorm: applied before the sublayer with pre_norm,
    after the residual sum without, which is where mtkit's Residual puts its norm either way.
    """
    enc, dec = spec.encoder, spec.decoder
    enc.embeddings[0].weight = _array(weights["src_embed.tokens.weight"])
    dec.embeddings.weight = _array(weights["tgt_embed.tokens.weight"])
    dec.projection.weight = dec.embeddings.weight  # section 3.4: tied, no output bias
    if "output.bias" in weights:  # model.output_bias (Marian's models)
        dec.projection.bias = _array(weights["output.bias"])
    enc.position_encodings.encodings = dec.position_encodings.encodings = positions
    for i, layer in enumerate(enc.layer):
        p = f"encoder.{i}"
        _attention(layer.self_attention, weights, f"{p}.attn", True)
        _norm(layer.self_attention.layer_norm, weights, f"{p}.res1.norm")
        _ffn(layer.ffn, weights, f"{p}.ffn", f"{p}.res2.norm")
    for i, layer in enumerate(dec.layer):
        p = f"decoder.{i}"
        _attention(layer.self_attention, weights, f"{p}.self_attn", True)
        _norm(layer.self_attention.layer_norm, weights, f"{p}.res1.norm")
        _attention(layer.attention, weights, f"{p}.cross_attn", False)
        _norm(layer.attention.layer_norm, weights, f"{p}.res2.norm")
        _ffn(layer.ffn, weights, f"{p}.ffn", f"{p}.res3.norm")
    if pre_norm:  # the final LayerNorm of each stack (model.py enc_norm / dec_norm)
        _norm(enc.layer_norm, weights, "enc_norm")
        _norm(dec.layer_norm, weights, "dec_norm")


def _tokens(subwords: Subwords) -> list[str]:
    """Pieces by mtkit id, specials under the names CTranslate2's config expects."""
    tokens = subwords.pieces
    tokens[:4] = [SPECIALS[i] for i in range(4)]
    if len(set(tokens)) < len(tokens):
        seen = sorted({t for t in tokens if tokens.count(t) > 1})
        raise UserError(f"vocabulary: pieces {seen[:3]} occur twice; CTranslate2 needs unique tokens")
    return tokens


def _build_spec(state: dict, source: str) -> Any:
    """A validated TransformerSpec holding the checkpoint's weights and vocabularies."""
    ct2 = _ctranslate2()
    cfg = config_from_dict(state["config"], source).model
    vocab = Vocab.from_state(state["vocab"])
    activation = {"relu": ct2.specs.Activation.RELU, "swish": ct2.specs.Activation.SWISH,
                  "gelu": ct2.specs.Activation.GELU}[cfg.activation]
    spec = ct2.specs.TransformerSpec.from_config(
        cfg.n_layers, cfg.n_heads, pre_norm=cfg.norm == "pre", activation=activation)
    # Section 3.5's table with sin/cos interleaved (model.sinusoids): CTranslate2's built-in table
    # puts all sines before all cosines, so it gets the explicit table.
    positions = sinusoids(cfg.max_positions, cfg.d_model).numpy()
    _fill(spec, state["model"], positions, cfg.norm == "pre")
    spec.register_source_vocabulary(_tokens(vocab.src))
    spec.register_target_vocabulary(_tokens(vocab.tgt))
    spec.config.layer_norm_epsilon = LAYER_NORM_EPS
    spec.config.add_source_eos = True  # mtkit reads source + EOS (batching.pad(suffix=EOS))
    spec.config.decoder_start_token = SPECIALS[BOS]  # the decoder starts from BOS at position 0
    spec.validate()
    return spec


def check_out_dir(out: Path, force: bool) -> None:
    """An export's directory may be new or empty; a non-empty one only with `force`."""
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise UserError(f"{out}: directory exists and is not empty (pass force=True / --force to overwrite)")


def _previous_export(entry: Path) -> bool:
    """What `force` may replace in an existing directory: the files an export writes, no others."""
    return entry.name in EXPORT_FILES


def export_ctranslate2(checkpoint: str | Path, out_dir: str | Path, quantization: str | None = None,
                       force: bool = False, card: str | None = None) -> Path:
    """Convert a checkpoint (or a run directory's model) into a CTranslate2 model directory, with
    `card` (a model card, mtkit.card) as README.md.

    `quantization` is CTranslate2's weight type (None keeps float32; int8, int8_float32, float16,
    ...). An existing non-empty `out_dir` is refused unless `force`, which replaces the files an
    export writes and leaves any others. Returns `out_dir`.
    """
    out = Path(out_dir)
    check_out_dir(out, force)
    path = resolve_model(checkpoint)
    state = load_checkpoint(path)
    spec = _build_spec(state, str(path))
    try:
        spec.optimize(quantization=quantization)
    except ValueError as exc:
        raise UserError(f"quantization {quantization!r}: {exc}") from None
    with atomic_dir(out, replace_only=_previous_export) as tmp:  # the whole export or none of it
        spec.save(str(tmp))
        vocab = state["vocab"]
        (tmp / SOURCE_SPM).write_bytes(vocab["src"])
        (tmp / TARGET_SPM).write_bytes(vocab.get("tgt") or vocab["src"])
        write_record(tmp, path, state, card, quantization=quantization, pieces=vocab.get("pieces"))
    return out


def write_record(out: Path, checkpoint: Path, state: dict, card: str | None, **extra) -> None:
    """What every export writes beside the model: mtkit_export.json (the checkpoint it came from,
    its step and config, and `extra`) and the model card as README.md."""
    info = {"checkpoint": str(checkpoint.resolve()), "step": state.get("step"), "config": state["config"],
            **extra}
    (out / INFO).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    if card is not None:
        (out / "README.md").write_text(card, encoding="utf-8")


@dataclass
class CT2Model:
    """A loaded export: the CTranslate2 translator, the run's vocabulary and settings."""

    translator: Any  # ctranslate2.Translator
    vocab: Vocab
    max_positions: int
    decode: DecodeConfig  # the checkpoint's decoding defaults


def load_ct2(model_dir: str | Path, device: str = "cpu", compute_type: str = "default",
             threads: int = 0, inter_threads: int = 1) -> CT2Model:
    """Load an export; `threads` is CTranslate2's intra_threads (0: its default) per batch, and
    `inter_threads` batches are translated at once (default one at a time)."""
    ct2, model_dir = _ctranslate2(), Path(model_dir)
    if not (model_dir / INFO).is_file():
        raise UserError(f"{model_dir}: not an mtkit CTranslate2 export (no {INFO})")
    info = json.loads((model_dir / INFO).read_text(encoding="utf-8"))
    cfg = config_from_dict(info["config"], str(model_dir / INFO))
    translator = ct2.Translator(str(model_dir), device=device, compute_type=compute_type,
                                intra_threads=threads, inter_threads=inter_threads)
    src, tgt = (model_dir / SOURCE_SPM).read_bytes(), (model_dir / TARGET_SPM).read_bytes()
    vocab = Vocab(src, None if tgt == src else tgt, info.get("pieces"))
    return CT2Model(translator, vocab, cfg.model.max_positions, cfg.decode)


def ct2_translate_nbest(model: CT2Model | str | Path, lines: list[str], nbest: int = 1, **overrides
                        ) -> list[Translation]:
    """Translations of `lines` by CTranslate2 through mtkit's line pipeline (mtkit.lines);
    `overrides` replace DecodeConfig fields (beam_size, length_penalty, max_tokens, max_len_offset).
    Batches are submitted together, so `inter_threads` of them run at once."""
    model = model if isinstance(model, CT2Model) else load_ct2(model)
    d = replace(model.decode, **{k: v for k, v in overrides.items() if v is not None})
    vocab, prefix = model.vocab, prefix_ids(model.vocab, d.prefix)
    limit = source_limit(model.max_positions, d.max_len_offset, len(prefix))

    def submit(job: Job) -> tuple[list, list[int]]:
        sources = [[vocab.src.id_to_piece(i) for i in ids] for ids in job[0]]
        steps = [output_steps(len(s), d.max_len_offset, model.max_positions) for s in sources]
        pending = model.translator.translate_batch(
            sources, beam_size=d.beam_size, length_penalty=d.length_penalty, patience=1.0,
            num_hypotheses=job[1], return_scores=True, max_input_length=0, max_decoding_length=max(steps),
            min_decoding_length=0, asynchronous=True,
            suppress_sequences=[[SPECIALS[PAD]], [SPECIALS[BOS]]])  # neither is ever an output in mtkit
        return pending, steps

    def collect(pending: list, steps: list[int]) -> list[list[Hypothesis]]:
        out = []
        for result, n in zip(pending, steps):
            hyps = result.result()
            out.append([Hypothesis([vocab.tgt.piece_to_id(p) or UNK for p in tokens[: n - 1]], score)
                        for tokens, score in zip(hyps.hypotheses, hyps.scores)])
        return out

    def mapper(_search, jobs: list[Job]):
        submitted = [submit(job) for job in jobs]  # all at once: inter_threads batches run in parallel
        return (collect(*s) for s in submitted)

    return translate_lines(vocab, lines, None, limit, d.max_tokens // d.beam_size, prefix, nbest,
                           mapper=mapper)


def ct2_translate(model: CT2Model | str | Path, lines: list[str], beam_size: int | None = None,
                  length_penalty: float | None = None, max_tokens: int | None = None,
                  max_len_offset: int | None = None) -> list[str]:
    """One translation per line, in order, as `mtkit translate` would produce them, with CTranslate2.

    Settings left None come from the checkpoint's decode config, as in `Translator.load`.
    `max_tokens` is mtkit's decode.max_tokens (source tokens x beam per batch).
    `length_penalty` is CTranslate2's alpha: score / length ** alpha (see the module docstring).
    """
    found = ct2_translate_nbest(model, lines, 1, beam_size=beam_size, length_penalty=length_penalty,
                                max_tokens=max_tokens, max_len_offset=max_len_offset)
    return [t.nbest[0][0] for t in found]
