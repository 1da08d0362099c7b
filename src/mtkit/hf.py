"""Hugging Face transformers: an mtkit model to and from a transformers model directory.

Export (`export_hf`): post-norm models become MarianMTModel, pre-norm models PegasusForConditional-
Generation (pre-norm layers and a final LayerNorm on each stack, as mtkit's). Both multiply
embeddings by sqrt(d_model), use biased q/k/v/out projections, tie the output projection to the
target embedding and have no embedding LayerNorm; the tokenizer is MarianTokenizer on the run's
SentencePiece model(s) with vocab.json holding mtkit's ids (PAD 0, UNK 1, BOS 2 = the decoder's
start, EOS 3).

Their sinusoid table puts all sines before all cosines; mtkit's interleaves them (section 3.5),
and transformers rebuilds its own table when it loads a model. The model dimension is therefore
permuted on the way (`layout`, `permute_stream`): a permutation of d_model applied to every weight
that reads or writes the residual stream computes the same function, since LayerNorm, attention and
the tied output only ever see the stream as a whole. Import applies the inverse.

Import (`import_hf`): a MarianMTModel directory as OPUS-MT publishes them (source.spm,
target.spm, vocab.json, post-norm, relu/swish/gelu, an output bias) becomes an mtkit checkpoint
with model.activation and model.output_bias set and the vocab.json ids as the vocabulary's id
map (mtkit's specials first; the decoder's start, Marian's <pad>, becomes BOS). A directory that
mtkit exported comes back with its own vocabulary, fingerprint and all.

`load_hf` / `to_transformers` + `hf_translate` translate lines with transformers' `generate`
through mtkit's own line pipeline (mtkit.lines).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from mtkit.checkpoint import MODEL_FILE, load_checkpoint, resolve_model, save_checkpoint
from mtkit.config import DecodeConfig, ModelConfig, RunConfig, config_from_dict, config_to_dict, save_config
from mtkit.data.batching import pad
from mtkit.data.vocab import BOS, EOS, PAD, SPECIAL_NAMES, Vocab, marian_pieces
from mtkit.errors import UserError
from mtkit.export import INFO, SOURCE_SPM, TARGET_SPM, check_out_dir, write_record
from mtkit.io import atomic_dir
from mtkit.lines import Job, Translation, output_steps, source_limit, translate_lines
from mtkit.model import Transformer
from mtkit.search import Hypothesis
from mtkit.translate import prefix_ids

INSTALL = 'pip install "mtkit[hf]"'
VOCAB, TARGET_VOCAB = "vocab.json", "target_vocab.json"
# Everything an export writes; only these are replaced when `force` overwrites a directory.
EXPORT_FILES = ("config.json", "generation_config.json", "model.safetensors", SOURCE_SPM, TARGET_SPM, VOCAB,
                TARGET_VOCAB, "tokenizer_config.json", "special_tokens_map.json", "README.md", INFO)
ACTIVATIONS = {"relu": "relu", "swish": "swish", "gelu": "gelu"}  # mtkit -> transformers (ACT2FN)
IMPORTED_ACTIVATIONS = {"relu": "relu", "swish": "swish", "silu": "swish", "gelu": "gelu"}
DIFFERENCES = [
    ("length penalty: transformers divides a finished beam's log-probability by length ** alpha, mtkit by "
     "((5 + length) / 6) ** alpha (Wu et al. 2016); the same alpha is passed to both, so beam outputs "
     "may differ"),
    ("length limit: one max_new_tokens per generate call (the batch's largest), EOS forced at it; "
     "outputs are cut to mtkit's per-sentence limit: exact for greedy search, close for beam"),
]


def _transformers() -> Any:
    """The transformers module, or a UserError that says how to install it."""
    try:
        import transformers
    except ImportError:
        raise UserError(f"converting to or from Hugging Face transformers needs transformers: "
                        f"{INSTALL}") from None
    return transformers


# --- the model dimension's layout -----------------------------------------------------------------

def layout(d_model: int) -> torch.Tensor:
    """transformers' dimension j holds mtkit's dimension LAYOUT[j]: sines (mtkit's even
    dimensions) first, then cosines (the odd ones), as transformers' sinusoid table has them."""
    return torch.cat([torch.arange(0, d_model, 2), torch.arange(1, d_model, 2)])


def permute_stream(weights: dict[str, torch.Tensor], order: torch.Tensor) -> dict[str, torch.Tensor]:
    """mtkit weights with the residual stream's dimensions reordered: new dimension j is old
    dimension order[j] in every weight that reads (columns) or writes (rows) the stream."""
    out = {}
    for name, w in weights.items():
        leaf = name.rsplit(".", 2)
        module, kind = leaf[-2] if len(leaf) > 1 else "", leaf[-1]
        if name.endswith("embed.tokens.weight") or (module in ("q", "k", "v", "w1") and kind == "weight"):
            w = w[:, order]  # reads the stream
        elif module in ("out", "w2"):
            w = w[order]  # writes it (weight rows, bias)
        elif module == "norm" or name.startswith(("enc_norm.", "dec_norm.")):
            w = w[order]
        out[name] = w.contiguous()
    return out


# --- mtkit <-> transformers names ---------------------------------------------------------------

def _layer_names(n_layers: int, pre: bool) -> dict[str, str]:
    """mtkit module name -> transformers module name (under "model."), for Linear and LayerNorm."""
    names = {}
    attn = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "out": "out_proj"}
    for i in range(n_layers):
        enc, dec = f"encoder.layers.{i}", f"decoder.layers.{i}"
        for ours, theirs in attn.items():
            names[f"encoder.{i}.attn.{ours}"] = f"{enc}.self_attn.{theirs}"
            names[f"decoder.{i}.self_attn.{ours}"] = f"{dec}.self_attn.{theirs}"
            names[f"decoder.{i}.cross_attn.{ours}"] = f"{dec}.encoder_attn.{theirs}"
        # Both keep one LayerNorm per sublayer, before it (pre-norm) or after the sum (post-norm).
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


def _hf_config(cfg: ModelConfig, src_vocab: int, tgt_vocab: int) -> Any:
    """MarianConfig (post-norm) or PegasusConfig (pre-norm) of mtkit's dimensions and special ids."""
    tf = _transformers()
    common = {
        "d_model": cfg.d_model, "encoder_layers": cfg.n_layers, "decoder_layers": cfg.n_layers,
        "encoder_attention_heads": cfg.n_heads, "decoder_attention_heads": cfg.n_heads,
        "encoder_ffn_dim": cfg.d_ff, "decoder_ffn_dim": cfg.d_ff,
        "activation_function": ACTIVATIONS[cfg.activation], "scale_embedding": True,
        "max_position_embeddings": cfg.max_positions, "dropout": cfg.dropout,
        "attention_dropout": cfg.attention_dropout, "activation_dropout": cfg.activation_dropout,
        "encoder_layerdrop": 0.0, "decoder_layerdrop": 0.0, "pad_token_id": PAD, "bos_token_id": BOS,
        "eos_token_id": EOS, "decoder_start_token_id": BOS, "forced_eos_token_id": EOS,
        "is_encoder_decoder": True}
    if cfg.norm == "pre":
        if not cfg.share_embeddings:
            raise UserError("a pre-norm model exports as PegasusForConditionalGeneration, which shares one "
                            "embedding matrix between encoder and decoder; this model has two "
                            "(model.share_embeddings: false)")
        return tf.PegasusConfig(vocab_size=src_vocab, tie_word_embeddings=True, **common)
    return tf.MarianConfig(vocab_size=src_vocab, decoder_vocab_size=tgt_vocab,
                           share_encoder_decoder_embeddings=cfg.share_embeddings,
                           tie_word_embeddings=True, **common)  # the output is always the target embedding


def generation_settings(decode: DecodeConfig, max_new_tokens: int | None = None,
                        max_length: int | None = None) -> dict:
    """`generate` settings closest to mtkit's search: beam size, alpha, stop at beam_size finished
    hypotheses, never PAD or BOS, EOS forced at the length limit (`max_new_tokens` after the
    decoder's start token, else `max_length` with it)."""
    beam = ({"length_penalty": decode.length_penalty, "early_stopping": True} if decode.beam_size > 1
            else {"length_penalty": 1.0, "early_stopping": False})  # greedy: transformers' defaults
    return {"num_beams": decode.beam_size, "do_sample": False, "num_return_sequences": 1, "bos_token_id": BOS,
            "eos_token_id": EOS, "pad_token_id": PAD, "decoder_start_token_id": BOS,
            "forced_eos_token_id": EOS, "suppress_tokens": [PAD, BOS],
            # max_length counts the decoder's start token; only it is set, so no model default competes
            "max_length": max_new_tokens + 1 if max_new_tokens else max_length, **beam}


def generation_config(decode: DecodeConfig, max_length: int) -> Any:
    """The GenerationConfig saved with an export (generation_config.json)."""
    return _transformers().GenerationConfig(**generation_settings(decode, max_length=max_length))


@torch.no_grad()
def convert(weights: dict, cfg: ModelConfig, src_vocab: int, tgt_vocab: int,
            decode: DecodeConfig | None = None) -> Any:
    """mtkit Transformer weights (vocabularies of `src_vocab` and `tgt_vocab` pieces) -> an
    equivalent transformers model (eval mode, float32, CPU) whose generation config is mtkit's
    decoding (`decode`)."""
    tf = _transformers()
    decode = decode or DecodeConfig()
    config = _hf_config(cfg, src_vocab, tgt_vocab)
    cls = tf.PegasusForConditionalGeneration if cfg.norm == "pre" else tf.MarianMTModel
    hf = cls(config).eval()
    target = hf.state_dict()
    w = permute_stream({k: v.float() for k, v in weights.items()}, layout(cfg.d_model))
    src, tgt = w["src_embed.tokens.weight"], w["tgt_embed.tokens.weight"]
    state = {"model.encoder.embed_tokens.weight": src, "model.decoder.embed_tokens.weight": tgt,
             "lm_head.weight": tgt}  # tied
    if "model.shared.weight" in target:
        state["model.shared.weight"] = src
    if "final_logits_bias" in target:
        bias = w.get("output.bias")
        state["final_logits_bias"] = (torch.zeros_like(target["final_logits_bias"]) if bias is None
                                      else bias[None].clone())
    for ours, theirs in _layer_names(cfg.n_layers, cfg.norm == "pre").items():
        state[f"{theirs}.weight"], state[f"{theirs}.bias"] = w[f"{ours}.weight"], w[f"{ours}.bias"]
    for stack in ("encoder", "decoder"):  # transformers' own table: the permutation made it ours
        key = f"model.{stack}.embed_positions.weight"
        if key in target:
            state[key] = target[key]
    if set(state) != set(target):  # every tensor of the transformers model comes from mtkit, nothing else
        raise ValueError(f"conversion mismatch: missing {sorted(set(target) - set(state))[:5]}, "
                         f"unexpected {sorted(set(state) - set(target))[:5]}")
    for name, tensor in state.items():
        target[name].copy_(tensor)
    for name, tensor in state.items():  # tied parameters must not have overwritten each other
        if not torch.equal(target[name], tensor.to(target[name].dtype)):
            raise ValueError(f"conversion: {name} does not hold its weights (tied to a different matrix?)")
    hf.generation_config = generation_config(decode, max_length=cfg.max_positions)
    return hf


# --- tokenizer files ------------------------------------------------------------------------------

def _vocab_json(pieces: list[str]) -> dict[str, int]:
    """{piece: mtkit id}, the specials under the names MarianTokenizer expects."""
    names = [*SPECIAL_NAMES, *pieces[len(SPECIAL_NAMES):]]
    if len(set(names)) < len(names):
        twice = sorted({p for p in names if names.count(p) > 1})
        raise UserError(f"vocabulary: pieces {twice[:3]} occur twice; a transformers tokenizer needs unique "
                        "pieces")
    return {p: i for i, p in enumerate(names)}


def _write_tokenizer(vocab: Vocab, cfg: RunConfig, out: Path) -> None:
    """MarianTokenizer's files: the SentencePiece models, vocab.json (+ target_vocab.json when the
    two sides have ids of their own), tokenizer_config.json naming the class."""
    (out / SOURCE_SPM).write_bytes(vocab.src_model)
    (out / TARGET_SPM).write_bytes(vocab.tgt_model)
    separate = not vocab.shared_ids
    (out / VOCAB).write_text(json.dumps(_vocab_json(vocab.src.pieces), ensure_ascii=False), encoding="utf-8")
    if separate:
        (out / TARGET_VOCAB).write_text(json.dumps(_vocab_json(vocab.tgt.pieces), ensure_ascii=False),
                                        encoding="utf-8")
    tokenizer = {"tokenizer_class": "MarianTokenizer", "source_lang": cfg.data.src_lang,
                 "target_lang": cfg.data.tgt_lang, "unk_token": "<unk>", "eos_token": "</s>",
                 "pad_token": "<pad>", "model_max_length": cfg.model.max_positions - 1,
                 "separate_vocabs": separate}
    if separate:
        tokenizer["target_vocab_file"] = TARGET_VOCAB
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer, indent=2) + "\n", encoding="utf-8")
    (out / "special_tokens_map.json").write_text(json.dumps(
        {"unk_token": "<unk>", "eos_token": "</s>", "pad_token": "<pad>"}, indent=2) + "\n", encoding="utf-8")


def _previous_export(entry: Path) -> bool:
    return entry.name in EXPORT_FILES


def export_hf(checkpoint: str | Path, out_dir: str | Path, force: bool = False,
              card: str | None = None) -> Path:
    """Write a transformers model directory (safetensors weights, config.json, generation_config.json,
    tokenizer files, mtkit_export.json, and `card` as README.md) for a checkpoint or run directory.
    An existing non-empty `out_dir` is refused unless `force`, which replaces only what an export
    writes. Returns `out_dir`."""
    out = Path(out_dir)
    check_out_dir(out, force)
    path = resolve_model(checkpoint)
    state = load_checkpoint(path)
    cfg = config_from_dict(state["config"], str(path))
    vocab = Vocab.from_state(state["vocab"])
    hf = convert(state["model"], cfg.model, vocab.src_size, vocab.tgt_size, cfg.decode)
    with atomic_dir(out, replace_only=_previous_export) as tmp:  # the whole export or none of it
        hf.save_pretrained(tmp)
        _write_tokenizer(vocab, cfg, tmp)
        write_record(tmp, path, state, card, vocab_fingerprint=vocab.fingerprint)
    return out


# --- translating with transformers ----------------------------------------------------------------

@dataclass
class HFModel:
    """A transformers model with mtkit's vocabulary and decoding settings."""

    model: Any  # transformers.PreTrainedModel with GenerationMixin
    vocab: Vocab
    max_positions: int
    decode: DecodeConfig  # the checkpoint's decoding defaults


def to_transformers(checkpoint: str | Path, device: str = "cpu") -> HFModel:
    """A checkpoint file or run directory -> the equivalent transformers model, in memory."""
    path = resolve_model(checkpoint)
    state = load_checkpoint(path)
    cfg = config_from_dict(state["config"], str(path))
    vocab = Vocab.from_state(state["vocab"])
    hf = convert(state["model"], cfg.model, vocab.src_size, vocab.tgt_size, cfg.decode)
    return HFModel(hf.to(device), vocab, cfg.model.max_positions, cfg.decode)


def load_hf(model_dir: str | Path, device: str = "cpu") -> HFModel:
    """A directory written by `export_hf`, loaded by transformers (AutoModelForSeq2SeqLM) as any
    user would, with the run's vocabulary and decoding settings."""
    tf, model_dir = _transformers(), Path(model_dir)
    if not (model_dir / INFO).is_file():
        raise UserError(f"{model_dir}: not an mtkit transformers export (no {INFO})")
    info = json.loads((model_dir / INFO).read_text(encoding="utf-8"))
    cfg = config_from_dict(info["config"], str(model_dir / INFO))
    hf = tf.AutoModelForSeq2SeqLM.from_pretrained(model_dir).eval().to(device)
    vocab, _, _ = _import_vocab(model_dir, hf.config, (model_dir / TARGET_VOCAB).is_file())
    return HFModel(hf, vocab, cfg.model.max_positions, cfg.decode)


def generate_ids(hf: Any, src: torch.Tensor, max_new_tokens: int, decode: DecodeConfig,
                 nbest: int = 1) -> list[list[Hypothesis]]:
    """n-best Hypotheses (token ids without BOS/EOS, score) per row of a padded source batch (B, S)
    ending in EOS, by `generate`."""
    settings = {**generation_settings(decode, max_new_tokens), "num_return_sequences": nbest,
                "output_scores": True, "return_dict_in_generate": True}
    with torch.inference_mode():
        src = src.to(hf.device)
        # every setting as an argument: those outrank the model's generation config in transformers 4
        # (which replaces a given config's default-valued fields with the model's) and 5 alike
        out = hf.generate(input_ids=src, attention_mask=src != PAD, **settings)
    scores = (out.sequences_scores.tolist() if getattr(out, "sequences_scores", None) is not None
              else [0.0] * out.sequences.size(0))
    rows = []
    for row in out.sequences[:, 1:].tolist():  # drop the decoder's start token, BOS
        rows.append(row[: row.index(EOS)] if EOS in row else [t for t in row if t != PAD])
    return [[Hypothesis(rows[b * nbest + k], scores[b * nbest + k]) for k in range(nbest)]
            for b in range(src.size(0))]


def hf_translate_nbest(model: HFModel, lines: list[str], nbest: int = 1, **overrides) -> list[Translation]:
    """Translations of `lines` by `generate`, through mtkit's line pipeline (order, empty lines, long
    lines in pieces, token-budget batches); `overrides` replace DecodeConfig fields."""
    d = replace(model.decode, **{k: v for k, v in overrides.items() if v is not None})
    prefix = prefix_ids(model.vocab, d.prefix)
    limit = source_limit(model.max_positions, d.max_len_offset, len(prefix))

    def search(job: Job) -> list[list[Hypothesis]]:
        sources = job[0]
        steps = [output_steps(len(s), d.max_len_offset, model.max_positions) for s in sources]
        found = generate_ids(model.model, pad(sources, suffix=EOS), max(steps), d, job[1])
        for hyps, n in zip(found, steps):  # mtkit's per-sentence limit: n steps, the last EOS
            for h in hyps:
                h.tokens[:] = h.tokens[: n - 1]
        return found

    return translate_lines(model.vocab, lines, search, limit, d.max_tokens // d.beam_size, prefix, nbest)


def hf_translate(model: HFModel, lines: list[str], **overrides) -> list[str]:
    """One translation per line, in order, as `mtkit translate` would produce them, with `generate`
    (see DIFFERENCES for beam search)."""
    return [t.nbest[0][0] for t in hf_translate_nbest(model, lines, 1, **overrides)]


# --- import ---------------------------------------------------------------------------------------

def _read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path}: not found ({what})") from None
    except (OSError, ValueError) as exc:
        raise UserError(f"{path}: not readable JSON ({str(exc).splitlines()[0][:120]})") from None


def _import_config(c: Any, model_dir: Path) -> ModelConfig:
    """mtkit's ModelConfig of a MarianConfig; what mtkit cannot represent is one UserError naming it."""
    problems = []
    kind = getattr(c, "model_type", None)
    if kind not in ("marian", "pegasus"):
        raise UserError(f"{model_dir}: model_type {kind!r}; mtkit imports MarianMTModel directories "
                        "(model_type marian) and its own pre-norm exports (pegasus)")
    for ours, a, b in [("layers", "encoder_layers", "decoder_layers"),
                       ("heads", "encoder_attention_heads", "decoder_attention_heads"),
                       ("feed-forward sizes", "encoder_ffn_dim", "decoder_ffn_dim")]:
        if getattr(c, a) != getattr(c, b):
            problems.append(f"{a} {getattr(c, a)} != {b} {getattr(c, b)} (mtkit's encoder and decoder have "
                            f"equal {ours})")
    if c.activation_function not in IMPORTED_ACTIVATIONS:
        problems.append(f"activation_function {c.activation_function!r} (mtkit has relu, swish, gelu)")
    if not getattr(c, "scale_embedding", False):
        problems.append("scale_embedding false (mtkit scales embeddings by sqrt(d_model))")
    if problems:
        raise UserError(f"{model_dir}: cannot import: {'; '.join(problems)}")
    return ModelConfig(d_model=c.d_model, n_heads=c.encoder_attention_heads, d_ff=c.encoder_ffn_dim,
                       n_layers=c.encoder_layers, dropout=c.dropout, attention_dropout=c.attention_dropout,
                       activation_dropout=float(getattr(c, "activation_dropout", 0.0) or 0.0),
                       norm="pre" if kind == "pegasus" else "post",
                       share_embeddings=bool(getattr(c, "share_encoder_decoder_embeddings", True)),
                       max_positions=c.max_position_embeddings,
                       activation=IMPORTED_ACTIVATIONS[c.activation_function], output_bias=True)


def _import_weights(hf_state: dict, cfg: ModelConfig, src_rows: list[int], tgt_rows: list[int]
                    ) -> dict[str, torch.Tensor]:
    """mtkit weights from a MarianMTModel's (or Pegasus') state dict; `src_rows[i]` / `tgt_rows[i]`:
    the transformers id of mtkit's source / target id i."""
    shared = hf_state.get("model.shared.weight")
    enc = hf_state["model.encoder.embed_tokens.weight"] if shared is None else shared
    dec = hf_state["model.decoder.embed_tokens.weight"] if shared is None else shared
    head = hf_state.get("lm_head.weight")
    if head is not None and not torch.equal(head, dec):
        raise UserError("cannot import: lm_head is not the decoder's embedding matrix (an untied output "
                        "projection)")
    w = {"src_embed.tokens.weight": enc[src_rows], "tgt_embed.tokens.weight": dec[tgt_rows],
         "output.bias": hf_state["final_logits_bias"].reshape(-1)[tgt_rows]}
    for ours, theirs in _layer_names(cfg.n_layers, cfg.norm == "pre").items():
        w[f"{ours}.weight"], w[f"{ours}.bias"] = hf_state[f"{theirs}.weight"], hf_state[f"{theirs}.bias"]
    return permute_stream({k: v.float() for k, v in w.items()}, torch.argsort(layout(cfg.d_model)))


def _own_ids(ids: object, subwords: Any) -> bool:
    """Whether a vocab.json holds mtkit's own ids of a SentencePiece model (as mtkit exports write)."""
    try:
        return ids == _vocab_json(subwords.pieces)
    except UserError:
        return False


def _import_vocab(model_dir: Path, config: Any, separate: bool) -> tuple[Vocab, list[int], list[int]]:
    """The vocabulary of a transformers directory, and per side the transformers id of each mtkit id.

    vocab.json with mtkit's own ids (an mtkit export) gives back the original vocabulary, fingerprint
    and all; any other (OPUS-MT's) becomes the vocabulary's id map, shared by both sides."""
    src, tgt = (model_dir / SOURCE_SPM).read_bytes(), (model_dir / TARGET_SPM).read_bytes()
    try:
        own = Vocab(src, None if tgt == src else tgt)
    except ValueError as exc:
        raise UserError(f"{model_dir}: {exc}") from None
    ids = _read_json(model_dir / VOCAB, "vocabulary")
    tgt_ids = _read_json(model_dir / TARGET_VOCAB, "target vocabulary") if separate else ids
    if _own_ids(ids, own.src) and _own_ids(tgt_ids, own.tgt) and (separate or own.shared_ids):
        return own, list(range(own.src_size)), list(range(own.tgt_size))
    if separate:
        raise UserError(f"{model_dir}: cannot import: separate source and target vocabularies whose ids are "
                        "not mtkit's (mtkit shares one id map between two SentencePiece models)")
    names = {"pad": _piece_of(ids, config.pad_token_id, "<pad>"),
             "eos": _piece_of(ids, config.eos_token_id, "</s>")}
    pieces = marian_pieces(ids, str(model_dir / VOCAB), names)
    vocab = Vocab(src, None if tgt == src else tgt, pieces)
    start = config.decoder_start_token_id
    start = config.pad_token_id if start is None else start
    rows = [ids.get(p, -1) for p in pieces]
    rows[PAD], rows[BOS] = config.pad_token_id, start  # the decoder starts from BOS, Marian's from <pad>
    if min(rows) < 0 or max(rows) >= config.vocab_size:
        raise UserError(f"{model_dir}: {VOCAB} has ids outside the model's {config.vocab_size} embeddings")
    return vocab, rows, rows


def import_hf(model_dir: str | Path, out_dir: str | Path, force: bool = False) -> Path:
    """A MarianMTModel directory (or mtkit's export of a pre-norm model, Pegasus) -> `out_dir` with
    model.pt (an mtkit checkpoint: weights, config, vocabulary) and config.yaml (its settings, the
    model section to fine-tune it with). Returns the checkpoint's path."""
    tf, model_dir, out = _transformers(), Path(model_dir), Path(out_dir)
    if not (model_dir / "config.json").is_file():
        raise UserError(f"{model_dir}: not a transformers model directory (no config.json)")
    check_out_dir(out, force)
    config = tf.AutoConfig.from_pretrained(model_dir)
    cfg = _import_config(config, model_dir)
    for name in (SOURCE_SPM, TARGET_SPM, VOCAB):
        if not (model_dir / name).is_file():
            raise UserError(f"{model_dir}: no {name} (a MarianMTModel directory has source.spm, target.spm "
                            "and vocab.json)")
    tokenizer = _read_json(model_dir / "tokenizer_config.json", "tokenizer") if (
        model_dir / "tokenizer_config.json").is_file() else {}
    separate = bool(tokenizer.get("separate_vocabs")) or (model_dir / TARGET_VOCAB).is_file()
    vocab, src_rows, tgt_rows = _import_vocab(model_dir, config, separate)
    hf = tf.AutoModelForSeq2SeqLM.from_pretrained(model_dir)
    hf_state = hf.state_dict()
    # an all-zero output bias (as mtkit's own exports have) is no bias: the paper's model
    cfg = replace(cfg, output_bias=bool(hf_state["final_logits_bias"].any()))
    weights = _import_weights(hf_state, cfg, src_rows, tgt_rows)
    if not cfg.output_bias:
        del weights["output.bias"]
    run = RunConfig(model=cfg)
    # data: where fine-tuning data would go (a config that trains from this model sets its own)
    run.data = replace(run.data, src_lang=tokenizer.get("source_lang") or run.data.src_lang,
                       tgt_lang=tokenizer.get("target_lang") or run.data.tgt_lang,
                       splits={"train": "train", "valid": "valid"})
    id_map = str((model_dir / VOCAB).resolve()) if vocab.id_map is not None else None
    run.tokenizer = replace(run.tokenizer, joint=vocab.joint, vocab=id_map, vocab_size=vocab.src_size,
                            model=None, src_model=None, tgt_model=None)
    if vocab.joint:
        run.tokenizer.model = str((model_dir / SOURCE_SPM).resolve())
    else:
        run.tokenizer.src_model = str((model_dir / SOURCE_SPM).resolve())
        run.tokenizer.tgt_model = str((model_dir / TARGET_SPM).resolve())
    gen = getattr(hf, "generation_config", None)
    beams = getattr(gen, "num_beams", None) or 1
    run.decode = replace(run.decode, beam_size=beams, max_tokens=max(run.decode.max_tokens, beams))
    if (model_dir / INFO).is_file():  # exported by mtkit: its decoding settings, whole
        run.decode = config_from_dict(_read_json(model_dir / INFO, "export record")["config"],
                                      str(model_dir / INFO)).decode
    model = Transformer(cfg, vocab.src_size, vocab.tgt_size)
    model.load_state_dict(weights)  # every weight of mtkit's model, and no other
    state = {"model": model.state_dict(), "config": config_to_dict(run), "vocab": vocab.to_state(),
             "vocab_fingerprint": vocab.fingerprint, "step": 0, "imported_from": str(model_dir.resolve())}
    with atomic_dir(out, replace_only=lambda entry: entry.name in (MODEL_FILE, "config.yaml")) as tmp:
        save_checkpoint(state, tmp / MODEL_FILE)
        save_config(run, tmp / "config.yaml")
    return out / MODEL_FILE


def _piece_of(ids: dict[str, int], token_id: int | None, default: str) -> str:
    """The piece vocab.json gives `token_id` (Marian names its specials as it likes)."""
    for piece, i in ids.items():
        if i == token_id:
            return piece
    return default
