"""An mtkit checkpoint as a Hugging Face `transformers` model with the same weights and function,
and `hf_translate`, which translates lines with its `generate` the way `mtkit translate` does:
the transformers peer of scripts/bench_translate.py.

Pre-norm -> M2M100ForConditionalGeneration (pre-norm layers, a final LayerNorm on each stack);
post-norm -> MarianMTModel (the paper's LayerNorm(x + Sublayer(x))). Both multiply embeddings by
sqrt(d_model), use biased q/k/v/out projections and a ReLU FFN, and have no embedding LayerNorm.
Their sinusoid tables are laid out [sin | cos], and M2M100's starts at row padding_idx + 1 (fairseq),
so the converter overwrites both with model.sinusoids, section 3.5's interleaved table.

Decoding differences from mtkit's search.py (see DIFFERENCES): the length penalty (transformers
divides a finished beam's score by length ** alpha, mtkit by ((5 + length) / 6) ** alpha), the
length limit (one per `generate` call, outputs cut to each sentence's limit, as ct2_translate does),
long lines (truncated, not translated in pieces). Greedy search (beam 1) gives mtkit's output.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mtkit.checkpoint import load_checkpoint, resolve_model
from mtkit.config import DecodeConfig, ModelConfig, config_from_dict
from mtkit.data.batching import pad, token_batches
from mtkit.data.corpus import normalize
from mtkit.data.vocab import BOS, EOS, PAD, Vocab
from mtkit.model import sinusoids

INSTALL = 'pip install "mtkit[bench]"'
DIFFERENCES = [
    ("length penalty: transformers divides a finished beam's log-probability by length ** alpha, mtkit by "
     "((5 + length) / 6) ** alpha (Wu et al. 2016); the same alpha is passed to both, so beam outputs "
     "may differ"),
    ("stopping: early_stopping=True, a sentence ends once beam_size hypotheses have "
     "(mtkit with early_exit off)"),
    ("length limit: one max_new_tokens per generate call (the batch's largest source + offset), with EOS "
     "forced at it; outputs are cut to mtkit's per-sentence limit: exact for greedy search, close for beam"),
    "long lines: a source longer than the model's positions is truncated, not translated in pieces",
]


@dataclass
class HFModel:
    """A converted checkpoint: the transformers model, the SentencePiece models, the run's settings."""

    model: Any  # transformers.PreTrainedModel with GenerationMixin
    vocab: Vocab
    max_positions: int
    decode: DecodeConfig  # the checkpoint's decoding defaults


def _hf_config(cfg: ModelConfig, src_vocab: int, tgt_vocab: int) -> Any:
    """M2M100Config (pre-norm) or MarianConfig (post-norm) of mtkit's dimensions and special ids."""
    import transformers

    common = {
        "d_model": cfg.d_model, "encoder_layers": cfg.n_layers, "decoder_layers": cfg.n_layers,
        "encoder_attention_heads": cfg.n_heads, "decoder_attention_heads": cfg.n_heads,
        "encoder_ffn_dim": cfg.d_ff, "decoder_ffn_dim": cfg.d_ff, "activation_function": "relu",
        "scale_embedding": True, "max_position_embeddings": cfg.max_positions, "dropout": cfg.dropout,
        "attention_dropout": cfg.attention_dropout, "activation_dropout": 0.0, "encoder_layerdrop": 0.0,
        "decoder_layerdrop": 0.0, "pad_token_id": PAD, "bos_token_id": BOS, "eos_token_id": EOS,
        "decoder_start_token_id": BOS, "forced_eos_token_id": EOS, "is_encoder_decoder": True,
        "attn_implementation": "sdpa"}
    if cfg.norm == "pre":
        if src_vocab != tgt_vocab:
            raise ValueError("pre-norm models convert to M2M100, which has one vocabulary; this one has two")
        return transformers.M2M100Config(vocab_size=src_vocab, tie_word_embeddings=cfg.share_embeddings,
                                         **common)
    return transformers.MarianConfig(
        vocab_size=src_vocab, decoder_vocab_size=tgt_vocab,
        share_encoder_decoder_embeddings=cfg.share_embeddings,
        tie_word_embeddings=True, **common)  # mtkit's output projection is always the target embedding


def _layer_names(n_layers: int, pre: bool) -> dict[str, str]:
    """mtkit module name -> transformers module name (prefix "model."), for Linear and LayerNorm."""
    names = {}
    attn = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "out": "out_proj"}
    for i in range(n_layers):
        enc, dec = f"encoder.layers.{i}", f"decoder.layers.{i}"
        for ours, theirs in attn.items():
            names[f"encoder.{i}.attn.{ours}"] = f"{enc}.self_attn.{theirs}"
            names[f"decoder.{i}.self_attn.{ours}"] = f"{dec}.self_attn.{theirs}"
            names[f"decoder.{i}.cross_attn.{ours}"] = f"{dec}.encoder_attn.{theirs}"
        # Both libraries keep one LayerNorm per sublayer, before it (pre-norm) or after the sum (post).
        names |= {f"encoder.{i}.res1.norm": f"{enc}.self_attn_layer_norm",
                  f"encoder.{i}.res2.norm": f"{enc}.final_layer_norm",
                  f"encoder.{i}.ffn.w1": f"{enc}.fc1", f"encoder.{i}.ffn.w2": f"{enc}.fc2",
                  f"decoder.{i}.res1.norm": f"{dec}.self_attn_layer_norm",
                  f"decoder.{i}.res2.norm": f"{dec}.encoder_attn_layer_norm",
                  f"decoder.{i}.res3.norm": f"{dec}.final_layer_norm",
                  f"decoder.{i}.ffn.w1": f"{dec}.fc1", f"decoder.{i}.ffn.w2": f"{dec}.fc2"}
    if pre:  # the final LayerNorm of each stack (model.py enc_norm / dec_norm)
        names |= {"enc_norm": "encoder.layer_norm", "dec_norm": "decoder.layer_norm"}
    return {ours: f"model.{theirs}" for ours, theirs in names.items()}


def _hf_weights(weights: dict, cfg: ModelConfig, target: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The transformers state dict holding mtkit's `weights`, for the model whose state dict is `target`."""
    src, tgt = weights["src_embed.tokens.weight"], weights["tgt_embed.tokens.weight"]
    out = {"model.encoder.embed_tokens.weight": src, "model.decoder.embed_tokens.weight": tgt,
           "lm_head.weight": tgt}  # section 3.4: no output bias
    if "model.shared.weight" in target:
        out["model.shared.weight"] = src
    if "final_logits_bias" in target:  # Marian's output bias: mtkit has none
        out["final_logits_bias"] = torch.zeros_like(target["final_logits_bias"])
    for ours, theirs in _layer_names(cfg.n_layers, cfg.norm == "pre").items():
        out[f"{theirs}.weight"], out[f"{theirs}.bias"] = weights[f"{ours}.weight"], weights[f"{ours}.bias"]
    for stack in ("encoder", "decoder"):  # Marian's table is a (frozen) parameter, in the state dict
        key = f"model.{stack}.embed_positions.weight"
        if key in target:
            out[key] = sinusoids(cfg.max_positions, cfg.d_model)
    return out


def _set_m2m100_positions(hf: Any, cfg: ModelConfig) -> None:
    """M2M100 reads row padding_idx + 1 + p (= 1 + p) for position p, row 0 for padding: mtkit's
    table one row down. The buffer is not in the state dict, so it is set here."""
    for stack in (hf.model.encoder, hf.model.decoder):
        table = stack.embed_positions.weights  # (max_positions + 2, D)
        rows = torch.zeros_like(table)
        rows[PAD + 1 :] = sinusoids(table.size(0) - PAD - 1, cfg.d_model)
        table.copy_(rows)


@torch.no_grad()
def convert(weights: dict, cfg: ModelConfig, src_vocab: int, tgt_vocab: int) -> Any:
    """mtkit Transformer weights -> an equivalent transformers model (eval mode, float32, CPU).

    Its own generation config is greedy with transformers' defaults: `generate_ids` passes the
    settings of each call, and transformers 4.50-4.57 fill a call's default-valued fields from
    the model's config, so a beam config here would turn greedy calls into beam search."""
    import transformers

    config = _hf_config(cfg, src_vocab, tgt_vocab)
    cls = transformers.M2M100ForConditionalGeneration if cfg.norm == "pre" else transformers.MarianMTModel
    hf = cls(config).eval()
    target = hf.state_dict()
    state = _hf_weights(weights, cfg, target)
    if set(state) != set(target):  # every tensor of the peer comes from mtkit, and nothing else
        raise ValueError(f"conversion mismatch: missing {sorted(set(target) - set(state))[:5]}, "
                         f"unexpected {sorted(set(state) - set(target))[:5]}")
    for name, tensor in state.items():
        target[name].copy_(tensor)
    for name, tensor in state.items():  # tied parameters must not have overwritten each other
        if not torch.equal(target[name], tensor.to(target[name].dtype)):
            raise ValueError(f"conversion: {name} does not hold its weights (tied to a different matrix?)")
    if cfg.norm == "pre":
        _set_m2m100_positions(hf, cfg)
    hf.generation_config = generation_config(DecodeConfig(beam_size=1), cfg.max_positions - 1)
    return hf


def to_transformers(checkpoint: str | Path, device: str = "cpu") -> HFModel:
    """A checkpoint file or run directory -> the equivalent transformers model with its vocabulary."""
    path = resolve_model(checkpoint)
    state = load_checkpoint(path)
    cfg = config_from_dict(state["config"], str(path))
    vocab = Vocab.from_state(state["vocab"])
    hf = convert(state["model"], cfg.model, vocab.src_size, vocab.tgt_size)
    return HFModel(hf.to(device), vocab, cfg.model.max_positions, cfg.decode)


def generation_config(decode: DecodeConfig, max_new_tokens: int) -> Any:
    """`generate` settings closest to mtkit's search: beam size, alpha, stop at beam_size finished
    hypotheses, no PAD, EOS forced at the length limit (search.py forces it at each sentence's)."""
    import transformers

    # Greedy: transformers' defaults, so that generate() inherits no beam flags from the model's config.
    beam = ({"length_penalty": decode.length_penalty, "early_stopping": True} if decode.beam_size > 1
            else {"length_penalty": 1.0, "early_stopping": False})
    return transformers.GenerationConfig(
        num_beams=decode.beam_size, do_sample=False, num_return_sequences=1, max_new_tokens=max_new_tokens,
        bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD, decoder_start_token_id=BOS,
        forced_eos_token_id=EOS, suppress_tokens=[PAD], **beam)


def generate_ids(hf: Any, src: torch.Tensor, max_new_tokens: int, beam_size: int = 1,
                 length_penalty: float = 0.6) -> list[list[int]]:
    """Token ids (no BOS/EOS) per row of a padded source batch (B, S) ending in EOS, via `generate`."""
    gen = generation_config(DecodeConfig(beam_size=beam_size, length_penalty=length_penalty), max_new_tokens)
    with torch.inference_mode():
        src = src.to(hf.device)
        out = hf.generate(input_ids=src, attention_mask=src != PAD, generation_config=gen)  # (B, 1 + T)
    rows = []
    for row in out[:, 1:].tolist():  # drop the decoder's start token, BOS
        rows.append(row[: row.index(EOS)] if EOS in row else [t for t in row if t != PAD])
    return rows


def hf_translate(model: HFModel, lines: list[str], beam_size: int | None = None,
                 length_penalty: float | None = None, max_tokens: int | None = None,
                 max_len_offset: int | None = None) -> list[str]:
    """One translation per line, in order, as `mtkit translate` would produce them, with `generate`.

    Settings left None come from the checkpoint's decode config; `max_tokens` is mtkit's
    decode.max_tokens (source tokens x beam per batch): batches are length-sorted as mtkit's.
    """
    d = model.decode
    beam = beam_size or d.beam_size
    alpha = d.length_penalty if length_penalty is None else length_penalty
    offset = d.max_len_offset if max_len_offset is None else max_len_offset
    budget = max(1, (max_tokens or d.max_tokens) // beam)
    texts = [normalize(line) for line in lines]
    todo = [i for i, text in enumerate(texts) if text]  # an empty line translates to an empty line
    limit = model.max_positions - 1  # the position table's last index
    sources = [ids[: limit - 1] for ids in model.vocab.encode_src([texts[i] for i in todo])]
    # search.py: at most min(source + EOS + offset, limit) steps, the last one EOS
    steps = [min(len(s) + 1 + offset, limit) for s in sources]
    found: list[list[int]] = [[] for _ in sources]
    lengths = [len(s) for s in sources]
    for batch in token_batches(lengths, lengths, budget) if sources else []:
        src = pad([sources[j] for j in batch], suffix=EOS)
        ids = generate_ids(model.model, src, max(steps[j] for j in batch), beam, alpha)
        for j, row in zip(batch, ids):
            found[j] = row[: steps[j] - 1]
    out = [""] * len(lines)
    for i, text in zip(todo, model.vocab.decode_tgt(found)):
        out[i] = text
    return out
