"""Run configuration: typed dataclasses for data, tokenizer, model, training and decoding.

Every default lives in its field; `load_config` reads YAML, applies `--set key=value` overrides,
rejects unknown keys and wrong types by name, and reports all problems at once.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from mtkit.errors import UserError


@dataclass
class CorpusConfig:
    """One corpus of a run with several (`data.corpora`): a direction, its files, weight and tag.

    A key left out takes the value of the `data:` block (its dir, format, splits, fields)."""

    name: str | None = None
    """Name in the manifest and the validation log; default SRC-TGT (give one when two corpora
    share a direction, e.g. bt for back-translations)."""
    src_lang: str | None = None
    """Source language; default data.src_lang."""
    tgt_lang: str | None = None
    """Target language; default data.tgt_lang."""
    format: Literal["text", "tsv", "jsonl", "hub"] | None = None
    """As data.format; default data.format."""
    dir: str | None = None
    """As data.dir; default data.dir."""
    splits: dict[str, str] | None = None
    """This corpus' splits (as data.splits; its train is required, a valid is validated on its own);
    default data.splits with this corpus' languages."""
    hub_name: str | None = None
    """As data.hub_name; default data.hub_name."""
    hub_config: str | None = None
    """As data.hub_config; default data.hub_config."""
    src_field: str | None = None
    """As data.src_field; default data.src_field."""
    tgt_field: str | None = None
    """As data.tgt_field; default data.tgt_field."""
    weight: float = 1.0
    """Upsampling factor of this corpus' training pairs in every epoch (2: each pair twice; 0.5: a
    fixed random half); the pairs sampled are counted in the manifest."""
    tag: str | None = None
    """Token put in front of every source sentence of this corpus (e.g. <2en> for the target
    language, <BT> for back-translations); one piece of the vocabulary, never split; at translation
    time `decode.prefix` / `translate --prefix` puts it in front of the input."""


def corpus_name(corpus: CorpusConfig, data: DataConfig) -> str:
    """A corpus' name: its own, else SRC-TGT of its languages (those of the `data:` block by default)."""
    return corpus.name or f"{corpus.src_lang or data.src_lang}-{corpus.tgt_lang or data.tgt_lang}"


@dataclass
class DataConfig:
    """Where the parallel corpus comes from, how it is cleaned, and where `prepare` writes it."""

    src_lang: str = "de"
    """Source language code; replaces `{lang}` in file patterns and names the default field."""
    tgt_lang: str = "en"
    """Target language code."""
    format: Literal["text", "tsv", "jsonl", "hub"] = "text"
    """text: a pair of files per split (plain or .gz); tsv: src<TAB>tgt; jsonl; hub: a `datasets` hub name."""
    dir: str | None = None
    """Directory that relative paths in `splits` are read from (default: the current directory)."""
    splits: dict[str, str] = field(default_factory=dict)
    """Split name -> file (pattern with `{lang}` for format text) or hub split name; needs train and valid."""
    hub_name: str | None = None
    """`datasets` hub dataset name (format hub), e.g. bentrevett/multi30k or wmt14."""
    hub_config: str | None = None
    """`datasets` hub config name, e.g. de-en for wmt14."""
    src_field: str | None = None
    """Field holding the source text in jsonl/hub records; dots descend (translation.de).
    Default: src_lang."""
    tgt_field: str | None = None
    """Field holding the target text in jsonl/hub records. Default: tgt_lang."""
    prepared_dir: str = "prepared/data"
    """Where `prepare` writes the tokenizer, binary shards and manifest."""
    max_tokens_per_sentence: int = 250
    """Training pairs with more subword tokens than this on either side are dropped."""
    max_length_ratio: float | None = 3.0
    """Training pairs whose subword length ratio (longer/shorter) exceeds this are dropped; None: off."""
    dedup: bool = False
    """Drop exact duplicate training pairs (after cleaning), keeping the first; hashes live on disk."""
    num_proc: int | Literal["auto"] = "auto"
    """Processes that decode, clean and encode chunks of pairs; 1: in-process; auto: every CPU core,
    in-process below 100k training pairs."""
    shard_size: int = 1_000_000
    """Pairs per binary shard file of a prepared split."""
    corpora: list[CorpusConfig] = field(default_factory=list)
    """Several corpora (directions, back-translations) in one run, each a mapping of the keys of
    `data.corpora[]`; empty: the one corpus this block describes."""


@dataclass
class TokenizerConfig:
    """SentencePiece subword model trained by `prepare` on the training split."""

    type: Literal["bpe", "unigram"] = "bpe"
    """Subword algorithm (the paper used BPE, section 5.1)."""
    vocab_size: int = 8000
    """Subword vocabulary size (per side when joint is false)."""
    joint: bool = True
    """One vocabulary for source and target (needed for shared embeddings, section 3.4)."""
    character_coverage: float = 1.0
    """Share of characters covered by the model; the rest goes through byte fallback."""
    byte_fallback: bool = True
    """Spell unseen characters as UTF-8 bytes instead of <unk>."""
    input_sentence_size: int | None = 2_000_000
    """Train SentencePiece on a random sample of at most this many sentences (both sides when
    joint); bounds its memory and time however large the corpus; None: all."""
    seed: int = 1
    """Seed of that sample (prepare is reproducible)."""
    model: str | None = None
    """An existing SentencePiece model (.model file) for both sides: prepare encodes with it instead
    of training one; its special ids are read from it, whatever they are."""
    src_model: str | None = None
    """An existing SentencePiece model for the source side only (with tgt_model and joint: false)."""
    tgt_model: str | None = None
    """An existing SentencePiece model for the target side only (with src_model and joint: false)."""
    from_model: str | None = None
    """The vocabulary of an mtkit checkpoint or run directory (what `train --init-from` on new data
    needs)."""
    vocab: str | None = None
    """With model or src_model + tgt_model: a JSON file {piece: id} (Marian's vocab.json) whose ids
    both sides share, so that embeddings may be shared with two SentencePiece models; its <pad>,
    <unk>, </s> (and <s>) become mtkit's special ids, the other pieces follow in its id order."""
    sampling_alpha: float | None = None
    """Subword regularisation in training: at the start of every epoch, the training sentences (both
    sides) are segmented anew at random by SentencePiece's sampling, with this alpha: the probability
    of dropping a merge for bpe (BPE-dropout), the smoothing of the segmentation distribution for
    unigram (Kudo, 2018); in (0, 1). The epoch's batches are then formed on the drawn lengths. Drawn
    segmentations are longer than the best one, so a batch of train.max_tokens holds fewer sentences.
    The epoch's draw is held in memory (a corpus of millions of pairs wants a machine to match).
    Validation and translation keep the one best segmentation; the prepared data is the same. None:
    no sampling."""


@dataclass
class ModelConfig:
    """The Transformer's dimensions (Table 3 of the paper)."""

    d_model: int = 512
    """Model width (paper base 512, big 1024)."""
    n_heads: int = 8
    """Attention heads h; d_k = d_v = d_model / h."""
    d_ff: int = 2048
    """Inner size of the position-wise feed-forward network."""
    n_layers: int = 6
    """Layers N in the encoder and in the decoder."""
    dropout: float = 0.1
    """P_drop on sublayer outputs and on embeddings + positions (section 5.4)."""
    attention_dropout: float = 0.0
    """Dropout on attention weights (not in the paper; 0 reproduces it)."""
    activation_dropout: float = 0.0
    """Dropout on the feed-forward network's hidden activations, max(0, x W1 + b1) (not in the paper;
    fairseq's activation_dropout; 0 reproduces it)."""
    norm: Literal["post", "pre"] = "post"
    """post: LayerNorm(x + Sublayer(x)) as the paper; pre: x + Sublayer(LayerNorm(x))."""
    share_embeddings: bool = True
    """Tie source, target and output embeddings (section 3.4); needs a joint vocabulary."""
    max_positions: int = 1024
    """Longest sequence the sinusoidal table covers."""
    activation: Literal["relu", "swish", "gelu"] = "relu"
    """The feed-forward network's nonlinearity: relu as the paper (section 3.3); swish (SiLU) and
    gelu for models made elsewhere (many OPUS-MT MarianMT models use swish)."""
    output_bias: bool = False
    """A bias on the output projection (the paper has none, section 3.4; Marian models have one)."""


@dataclass
class TrainConfig:
    """The training loop: batches, optimizer, schedule, validation and checkpoints."""

    run_dir: str = "runs/model"
    """Directory for checkpoints, logs, learning curves and the resolved config."""
    seed: int = 1
    """Seed for weights, dropout and batch order."""
    max_tokens: int | Literal["auto"] = 25000
    """Token budget per batch: padded length x sentences, max of source and target (paper ~25k).
    auto: on CUDA the largest budget that fits in memory (probed at start), on CPU 4096."""
    accum_steps: int = 1
    """Batches whose gradients are summed before one optimizer step."""
    pool_size: int | None = 1_000_000
    """Sort by length within pools of this many pairs drawn from random parts of the corpus (Marian's
    maxi-batches), so batching memory does not grow with it; None: one pool, the whole corpus."""
    max_steps: int = 100000
    """Stop after this many optimizer steps (paper base: 100k)."""
    max_epochs: int | None = None
    """Stop after this many passes over the data; None: no limit."""
    max_time: float | str | None = None
    """Stop after this much wall-clock time of one `mtkit train` invocation, final validation and
    checkpoint included: seconds or "90s", "15m", "2h" (a Slurm job's limit); --resume continues
    with a new budget; None: no limit."""
    lr_factor: float = 1.0
    """Multiplier on the paper's schedule d_model^-0.5 * min(step^-0.5, step * warmup^-1.5)."""
    warmup_steps: int = 4000
    """Linear warm-up steps of the schedule (section 5.3)."""
    lr_decay: Literal["inverse_sqrt", "linear"] = "inverse_sqrt"
    """After the warm-up: inverse_sqrt is the paper's step^-0.5; linear (not in the paper) falls from
    the same peak in a straight line to 0 at train.max_steps, for a budget known in steps: the last
    steps learn at a small rate, as checkpoint averaging would smooth them. Changing max_steps on
    resume changes the slope from there on."""
    adam_betas: tuple[float, float] = (0.9, 0.98)
    """Adam beta1, beta2 (section 5.3)."""
    adam_eps: float = 1e-9
    """Adam epsilon (section 5.3)."""
    weight_decay: float = 0.0
    """Decoupled weight decay (AdamW); 0 is the paper's Adam."""
    label_smoothing: float = 0.1
    """epsilon_ls of section 5.4."""
    rdrop_alpha: float = 0.0
    """R-Drop (Liang et al., 2021; not in the paper): each batch goes through the model twice with
    two dropout masks, and alpha weighs the symmetric KL divergence between the two output
    distributions (5 is theirs for translation). A step then costs about twice as much; 0: off."""
    clip_norm: float | None = None
    """Clip the gradient norm to this value; None: no clipping (the paper does not clip)."""
    valid_every: int = 1000
    """Validate (loss and beam-search BLEU) every this many steps, and at the end."""
    valid_bleu_sentences: int | None = None
    """Decode only the first this many validation sentences for BLEU; None: all."""
    log_every: int = 50
    """Write training metrics to the log every this many steps."""
    keep_last: int = 5
    """Keep this many most recent step checkpoints (plus the best and the last)."""
    patience: int | None = None
    """Stop when validation BLEU has not improved for this many validations; None: off."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """auto: CUDA when available, else CPU."""
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """auto: from the hardware: on CPU bf16 autocast only where the CPU computes bf16 natively
    (AVX512-BF16 or AMX), else fp32; on CUDA bf16 where the GPU supports it, else fp16 autocast
    with a gradient scaler. An explicit bf16 on a CPU without it is emulated (many times slower)."""
    threads: int | None = None
    """CPU threads for torch; None: torch's default."""
    compile: bool | Literal["auto"] = "auto"
    """torch.compile the model for training; auto: on CUDA only (compiling costs more than it saves
    on CPU)."""
    init_from: str | None = None
    """Fine-tune: start from the weights of this mtkit checkpoint or run directory (same model
    dimensions and vocabulary), with a fresh optimizer, schedule and step counter."""


@dataclass
class DecodeConfig:
    """Search settings for `translate`, `evaluate -m` and validation BLEU (section 6.1)."""

    beam_size: int = 4
    """Beam width; 1 is greedy search."""
    length_penalty: float = 0.6
    """alpha of Wu et al. (2016): scores are divided by ((5 + length) / 6) ** alpha."""
    max_len_offset: int = 50
    """Output length limit = source length + this (section 6.1)."""
    max_tokens: int = 8000
    """Token budget per translation batch (source tokens x beam); larger batches decode faster per
    sentence on CPU and GPU at the cost of memory (see docs/performance.md)."""
    stopping: Literal["finished", "bound"] = "finished"
    """When a sentence's beam search ends. finished: once beam_size hypotheses have ended (fairseq,
    and CTranslate2 with a length penalty). bound: once no live hypothesis can still beat the
    nbest-th best ended one, its score bounded with the length penalty at the length limit (the
    paper's "terminate early when possible", as in tensor2tensor): the best hypothesis the beam
    can find, at the cost of more steps."""
    early_exit: bool = False
    """Also end a sentence when a step's best candidate is EOS (CTranslate2 does so only without a
    length penalty): faster; off keeps searching as `stopping` says."""
    prefix: str | None = None
    """Tag put in front of every source line (a piece of the vocabulary, e.g. <2en> or <BT>), as
    `data.corpora[].tag` put it in front of the training sentences."""
    sample: bool = False
    """Sample each next token from the model's distribution instead of searching (back-translation);
    one output per line, reproducible under `seed`."""
    top_k: int = 0
    """Sampling: draw from the k most probable tokens only; 0: all."""
    top_p: float = 1.0
    """Sampling: draw from the smallest set of tokens whose probability reaches p (nucleus); 1: all."""
    temperature: float = 1.0
    """Sampling: divide the logits by this before the softmax (<1 sharper, >1 flatter)."""
    seed: int = 1
    """Sampling: seed of the draws (the same seed, input and model give the same output)."""


@dataclass
class RunConfig:
    """One run: everything `prepare`, `train` and `translate` need."""

    data: DataConfig = field(default_factory=DataConfig)
    """The `data:` block: the corpus, its cleaning and the prepared directory."""
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    """The `tokenizer:` block: the SentencePiece model."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """The `model:` block: the Transformer's dimensions."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """The `train:` block: the training loop."""
    decode: DecodeConfig = field(default_factory=DecodeConfig)
    """The `decode:` block: search settings."""


class _Loader(yaml.SafeLoader):
    """YAML as people write numbers: 1e9 and 1e-9 are floats (YAML 1.1 reads them as strings
    unless written 1.0e+9)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."))


def read_yaml(text: str) -> Any:
    """Parse YAML text with the loader above (safe: plain data only)."""
    return yaml.load(text, Loader=_Loader)  # a SafeLoader: plain data only


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return " or ".join(repr(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str, problems: list[str]) -> Any:
    """Check `value` against the annotation `tp`; return it converted (int -> float, list -> tuple)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        for option in inner:  # the first member that accepts the value wins
            trial: list[str] = []
            converted = _coerce(value, option, key, trial)
            if not trial:
                return converted
        if len(inner) == 1:
            return _coerce(value, inner[0], key, problems)
        names = " or ".join(_type_name(a) for a in inner)
        problems.append(f"{key}: expected {names}, got {_short(value)}")
        return value
    if origin is Literal:
        if value in args:
            return value
        problems.append(f"{key}: {_short(value)} is not one of {', '.join(map(str, args))}")
        return value
    if origin is dict:
        if not isinstance(value, dict):
            problems.append(f"{key}: expected a mapping, got {_short(value)}")
            return value
        return {str(k): _coerce(v, args[1], f"{key}.{k}", problems) for k, v in value.items()}
    if origin is list:
        if not isinstance(value, list):
            problems.append(f"{key}: expected a list, got {_short(value)}")
            return value
        item = args[0]
        if dataclasses.is_dataclass(item):
            return [_build(item, v, f"{key}[{i}]", problems) for i, v in enumerate(value)]
        return [_coerce(v, item, f"{key}[{i}]", problems) for i, v in enumerate(value)]
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            problems.append(f"{key}: expected a list of {len(args)} values, got {_short(value)}")
            return value
        return tuple(_coerce(v, a, f"{key}[{i}]", problems) for i, (v, a) in enumerate(zip(value, args)))
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if tp in (int, float) and isinstance(value, bool) or not isinstance(value, tp):
        problems.append(f"{key}: expected {_type_name(tp)}, got {_short(value)}")
    elif tp is int and abs(value) > MAX_INT:
        problems.append(f"{key}: {_short(value)} is out of range (at most {MAX_INT:,})")
    return value


MAX_INT = 2**31 - 1
"""No count, size or seed in a run comes near this; larger values would overflow C ints later."""


def _short(value: Any) -> str:
    """A value for an error message, cut short: building the message stays cheap whatever it is."""
    if isinstance(value, int) and abs(value) >= 10**30:  # repr of a huge int is slow, or refused
        return f"an integer of {value.bit_length()} bits"
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _build(cls: type, raw: Any, prefix: str, problems: list[str]) -> Any:
    """Build dataclass `cls` from a mapping, collecting unknown keys and type errors."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        problems.append(f"{prefix or 'config'}: expected a mapping, got {raw!r}")
        return cls()
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in raw.items():
        full = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else f" (known: {', '.join(names)})"
            problems.append(f"unknown key '{full}'{hint}")
            continue
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value, full, problems)
        else:
            kwargs[key] = _coerce(value, tp, full, problems)
    return cls(**kwargs)


def _check(cfg: RunConfig) -> list[str]:
    """Constraints between fields that types alone do not catch."""
    problems = []
    m, t, d = cfg.model, cfg.train, cfg.data
    if isinstance(m.n_heads, int) and m.n_heads >= 1 and m.d_model % m.n_heads:  # < 1: said below
        problems.append(f"model.d_model ({m.d_model}) must be divisible by model.n_heads ({m.n_heads})")
    tok = cfg.tokenizer
    if m.share_embeddings and not (tok.joint or tok.vocab or tok.from_model):
        problems.append("model.share_embeddings needs tokenizer.joint: true (or one id map: tokenizer.vocab)")
    for key, value in [("model.d_model", m.d_model), ("model.n_heads", m.n_heads),
                       ("model.d_ff", m.d_ff), ("model.n_layers", m.n_layers),
                       ("train.max_tokens", t.max_tokens), ("train.accum_steps", t.accum_steps),
                       ("train.max_steps", t.max_steps), ("train.warmup_steps", t.warmup_steps),
                       ("train.valid_every", t.valid_every), ("train.log_every", t.log_every),
                       ("train.keep_last", t.keep_last), ("decode.beam_size", cfg.decode.beam_size),
                       ("decode.max_tokens", cfg.decode.max_tokens),
                       ("tokenizer.vocab_size", cfg.tokenizer.vocab_size), ("data.num_proc", d.num_proc),
                       ("data.shard_size", d.shard_size), ("train.pool_size", t.pool_size),
                       ("tokenizer.input_sentence_size", cfg.tokenizer.input_sentence_size),
                       ("train.valid_bleu_sentences", t.valid_bleu_sentences), ("train.patience", t.patience),
                       ("train.max_epochs", t.max_epochs), ("model.max_positions", m.max_positions),
                       ("train.threads", t.threads),
                       ("data.max_tokens_per_sentence", d.max_tokens_per_sentence)]:
        if isinstance(value, int) and value < 1:
            problems.append(f"{key} must be >= 1, got {value}")
    for key, value in [("decode.max_len_offset", cfg.decode.max_len_offset),
                       ("tokenizer.seed", cfg.tokenizer.seed), ("train.seed", t.seed)]:
        if isinstance(value, int) and value < 0:
            problems.append(f"{key} must be >= 0, got {value}")
    for key, value in [("data.max_length_ratio", d.max_length_ratio), ("train.lr_factor", t.lr_factor),
                       ("train.clip_norm", t.clip_norm),
                       ("tokenizer.character_coverage", cfg.tokenizer.character_coverage)]:
        if isinstance(value, float) and not (math.isfinite(value) and value > 0):
            problems.append(f"{key} must be a positive number, got {value}")
    if (t.lr_decay == "linear" and isinstance(t.max_steps, int) and isinstance(t.warmup_steps, int)
            and t.max_steps <= t.warmup_steps):
        problems.append(f"train.lr_decay linear falls to 0 at train.max_steps ({t.max_steps}), which must be "
                        f"above train.warmup_steps ({t.warmup_steps})")
    alpha = cfg.tokenizer.sampling_alpha
    if isinstance(alpha, float) and not (math.isfinite(alpha) and 0 < alpha < 1):
        problems.append(f"tokenizer.sampling_alpha must be in (0, 1) or null, got {alpha}")
    if isinstance(cfg.tokenizer.character_coverage, float) and cfg.tokenizer.character_coverage > 1:
        problems.append(f"tokenizer.character_coverage must be at most 1, "
                        f"got {cfg.tokenizer.character_coverage}")
    for key, value in [("train.adam_eps", t.adam_eps), ("train.weight_decay", t.weight_decay),
                       ("train.rdrop_alpha", t.rdrop_alpha)]:
        if isinstance(value, float) and not (math.isfinite(value) and value >= 0):
            problems.append(f"{key} must be a number >= 0, got {value}")
    if isinstance(t.adam_betas, tuple) and not all(isinstance(b, float) and 0 <= b < 1 for b in t.adam_betas):
        problems.append(f"train.adam_betas must be two numbers in [0, 1), got {list(t.adam_betas)}")
    if isinstance(cfg.decode.length_penalty, float) and not 0.0 <= cfg.decode.length_penalty <= 10.0:
        problems.append(f"decode.length_penalty must be in [0, 10], got {_short(cfg.decode.length_penalty)}")
    for key, value in [("model.dropout", m.dropout), ("model.attention_dropout", m.attention_dropout),
                       ("model.activation_dropout", m.activation_dropout),
                       ("train.label_smoothing", t.label_smoothing)]:
        if isinstance(value, float) and not 0.0 <= value < 1.0:
            problems.append(f"{key} must be in [0, 1), got {value}")
    if not d.corpora and (d.format != "hub" or d.splits):
        for split in ("train", "valid"):
            if split not in d.splits:
                problems.append(f"data.splits.{split} is required")
    if t.max_time is not None:
        try:
            parse_duration(t.max_time)
        except ValueError as exc:
            problems.append(f"train.max_time: {exc}")
    if d.format == "hub" and not d.hub_name and not d.corpora:
        problems.append("data.hub_name is required when data.format is hub")
    problems += _check_corpora(cfg)
    problems += _check_tokenizer(cfg)
    dec = cfg.decode
    if isinstance(dec.top_k, int) and dec.top_k < 0:
        problems.append(f"decode.top_k must be >= 0, got {dec.top_k}")
    if isinstance(dec.top_p, float) and not 0.0 < dec.top_p <= 1.0:
        problems.append(f"decode.top_p must be in (0, 1], got {_short(dec.top_p)}")
    if isinstance(dec.temperature, float) and not (math.isfinite(dec.temperature) and dec.temperature > 0):
        problems.append(f"decode.temperature must be a positive number, got {_short(dec.temperature)}")
    if isinstance(dec.seed, int) and dec.seed < 0:
        problems.append(f"decode.seed must be >= 0, got {dec.seed}")
    return problems


def _check_tokenizer(cfg: RunConfig) -> list[str]:
    tok, problems = cfg.tokenizer, []
    given = [k for k in ("model", "src_model", "tgt_model", "from_model") if getattr(tok, k)]
    if len(given) > 1 and set(given) != {"src_model", "tgt_model"}:
        problems.append(f"tokenizer: give one of model, src_model + tgt_model, from_model "
                        f"(got {', '.join(given)})")
    elif (tok.src_model is None) != (tok.tgt_model is None):
        problems.append("tokenizer.src_model and tokenizer.tgt_model go together (one model per side); "
                        "tokenizer.model is one model for both")
    elif tok.src_model and tok.joint:
        problems.append("tokenizer.src_model/tgt_model are one model per side: set tokenizer.joint: false "
                        "(or give one joint tokenizer.model)")
    elif tok.vocab and not (tok.model or tok.src_model):
        problems.append("tokenizer.vocab gives the ids of tokenizer.model or tokenizer.src_model + "
                        "tgt_model: give those too")
    elif tok.model and not tok.joint:
        problems.append("tokenizer.model is one joint model: set tokenizer.joint: true "
                        "(or give tokenizer.src_model and tokenizer.tgt_model)")
    return problems


TAG_PATTERN = re.compile(r"^\S+$")


def _check_corpora(cfg: RunConfig) -> list[str]:
    problems, names = [], set()
    for i, c in enumerate(cfg.data.corpora):
        key = f"data.corpora[{i}]"
        if isinstance(c.weight, float) and not (math.isfinite(c.weight) and c.weight > 0):
            problems.append(f"{key}.weight must be a positive number, got {_short(c.weight)}")
        if c.tag is not None and not TAG_PATTERN.match(c.tag):
            problems.append(f"{key}.tag must be one word without spaces, got {_short(c.tag)}")
        splits = cfg.data.splits if c.splits is None else c.splits
        if "train" not in splits:
            problems.append(f"{key}.splits.train is required (or data.splits.train)")
        fmt = c.format or cfg.data.format
        if fmt == "hub" and not (c.hub_name or cfg.data.hub_name):
            problems.append(f"{key}.hub_name is required when its format is hub")
        name = corpus_name(c, cfg.data)
        if name in names:
            problems.append(f"{key}: another corpus is named {name!r}; give each a distinct name")
        names.add(name)
    if cfg.data.corpora and not any("valid" in (cfg.data.splits if c.splits is None else c.splits)
                                    for c in cfg.data.corpora):
        problems.append("data.corpora: no corpus has a valid split; validation needs one")
    return problems


_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(value: float | str) -> float:
    """Seconds of a duration: a number of seconds, or a number with a unit s, m, h or d ("1h30m" too)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = float(value)
    else:
        text = str(value).strip().lower().replace(" ", "")
        if re.fullmatch(r"\d+(\.\d*)?", text):
            text += "s"
        parts = re.fullmatch(r"((\d+(\.\d*)?|\.\d+)[smhd])+", text)
        if parts is None:
            raise ValueError(f"{_short(value)} is not a duration (seconds, or e.g. 90s, 15m, 2h, 1h30m)")
        seconds = sum(float(n) * _UNITS[u] for n, _, u in re.findall(r"(\d+(\.\d*)?|\.\d+)([smhd])", text))
    if not seconds > 0 or math.isinf(seconds):
        raise ValueError(f"{_short(value)} must be a positive, finite duration")
    return seconds


def _yaml_problem(exc: yaml.YAMLError) -> tuple[Any, str]:
    """Where a YAML error is (its mark, or None) and what it is."""
    return getattr(exc, "problem_mark", None), str(getattr(exc, "problem", exc))


def parse_override(item: str) -> tuple[list[str], Any]:
    """'model.n_layers=3' -> (['model', 'n_layers'], 3); the value is read as YAML.

    A value that is not YAML is taken as its text (a path such as `@runs/x`), unless it opens a
    list or mapping: that is a mistake in the YAML (an unquoted `{lang}` in a flow mapping, a missing
    bracket), named here rather than passed on as a string.
    """
    if "=" not in item:
        raise UserError(f"--set {item!r}: expected KEY=VALUE, e.g. model.n_layers=3")
    key, _, text = item.partition("=")
    try:
        value = read_yaml(text) if text.strip() else ""
    except yaml.YAMLError as exc:
        opened = text.lstrip()
        if opened[:1] in ("[", "{"):
            mark, problem = _yaml_problem(exc)
            where = f" at character {mark.column + 1}" if mark else ""
            hint = "; quote a value with braces, e.g. \"train.{lang}.gz\"" if "{" in opened[1:] else ""
            raise UserError(f"--set {item!r}: the value is not valid YAML{where} ({problem}){hint}") from None
        value = text
    return key.strip().split("."), value


def config_from_dict(raw: Any, source: str = "config", overrides: list[str] = ()) -> RunConfig:
    """Build and validate a RunConfig; raise one UserError listing every problem."""
    raw = dict(raw or {}) if isinstance(raw, dict) else raw
    problems: list[str] = []
    if isinstance(raw, dict):
        for item in overrides:
            path, value = parse_override(item)
            node = raw
            for part in path[:-1]:
                node = node.setdefault(part, {}) if isinstance(node, dict) else None
                if not isinstance(node, dict):
                    raise UserError(f"--set {item!r}: '{part}' is not a section")
            node[path[-1]] = value
    cfg = _build(RunConfig, raw, "", problems)
    if not problems:
        problems = _check(cfg)
    if problems:
        raise UserError(f"{source}: " + "; ".join(problems))
    return cfg


def load_config(path: str | Path, overrides: list[str] = ()) -> RunConfig:
    """Read a YAML run config, apply `--set` overrides and validate it."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"{path}: config file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: cannot read config ({exc})") from None
    try:
        raw = read_yaml(text)
    except yaml.YAMLError as exc:
        mark, problem = _yaml_problem(exc)
        where = f" line {mark.line + 1}" if mark else ""
        raise UserError(f"{path}:{where} invalid YAML ({problem})") from None
    return config_from_dict(raw, str(path), overrides)


def config_to_dict(cfg: RunConfig) -> dict:
    """Plain nested dict (tuples as lists) for YAML and checkpoints."""
    def plain(value: Any) -> Any:
        if isinstance(value, (tuple, list)):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value
    return plain(dataclasses.asdict(cfg))


def save_config(cfg: RunConfig, path: str | Path) -> None:
    """Write the resolved config as YAML, whole or not at all."""
    from mtkit.io import write_text

    write_text(path, yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
