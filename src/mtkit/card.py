"""Model cards: the README.md of an exported model directory, in the form the Hugging Face Hub reads.

`card_text` writes YAML front matter (languages, license, library, tags, datasets and, given test
scores, a `model-index` of them) and a short body: what the model is, its test scores with their
sacreBLEU signatures, the run's best validation BLEU, its training settings and how to translate
with it in Transformers, CTranslate2 and mtkit. Every figure comes from the checkpoint, the run's
log or the scores given; the same inputs give the same text.

`read_evaluation` reads one test set's scores, as `mtkit evaluate --json` prints them.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from mtkit.config import CorpusConfig, RunConfig, config_from_dict, corpus_name
from mtkit.errors import UserError
from mtkit.io import cause

ENGINES = {"transformers": "hf", "ctranslate2": "ctranslate2"}
"""The engines a card describes -> the `mtkit export --format` that writes their directory."""
METRICS = (("bleu", "BLEU"), ("chrf", "chrF"), ("ter", "TER"))
"""Scores a card reports: key in `mtkit evaluate --json` (and the Hub's metric id) -> display name."""
EVALUATE_JSON = "expected the output of `mtkit evaluate --json`"
TIED = "tgt_embed.tokens.weight"
"""With model.share_embeddings this is the source embedding matrix under a second name (model.py)."""


@dataclass
class Evaluation:
    """One scored test set: its name, sacreBLEU BLEU and chrF with their signatures (and TER if present)."""

    dataset: str
    bleu: float
    chrf: float | None
    signatures: dict[str, str]  # metric name -> sacreBLEU signature string
    n_sentences: int | None
    ter: float | None = None


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def read_evaluation(spec: str) -> Evaluation:
    """'NAME=FILE': the scores `mtkit evaluate --json` wrote to FILE, for the test set NAME.

    bleu and its signature are required; chrf and ter are taken with their signatures when present.
    A spec without '=', a missing or unreadable file, bad JSON or a missing key is a one-line
    UserError naming the spec or the file.
    """
    name, sep, file = spec.partition("=")
    name, file = name.strip(), file.strip()
    if not sep or not name or not file:
        raise UserError(f"--eval {spec!r}: expected NAME=FILE, e.g. newstest2014=eval.json "
                        "(FILE: what `mtkit evaluate --json` printed)")
    path = Path(file)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise UserError(f"{path}: evaluation file not found (--eval {name}={file})") from None
    except OSError as exc:
        raise UserError(f"{path}: cannot read evaluation file ({cause(exc)})") from None
    try:
        # bytes: json detects UTF-8, UTF-16 and UTF-32 with or without a BOM (a shell's redirection
        # on Windows writes UTF-16)
        data = json.loads(raw)
    except ValueError as exc:
        reason = (str(exc).splitlines() or [type(exc).__name__])[0][:120]
        raise UserError(f"{path}: not JSON ({reason}); {EVALUATE_JSON}") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: a JSON {type(data).__name__}, not an object; {EVALUATE_JSON}")
    signatures = data.get("signature")
    if not isinstance(signatures, dict):
        raise UserError(f"{path}: no 'signature' object; {EVALUATE_JSON}")
    scores: dict[str, float | None] = {}
    for key, _ in METRICS:
        if key not in data and key != "bleu":
            scores[key] = None
            continue
        if key not in data:
            raise UserError(f"{path}: no '{key}' key; {EVALUATE_JSON}")
        if not _number(data[key]):
            raise UserError(f"{path}: '{key}' is {str(data[key])[:40]!r}, not a number; {EVALUATE_JSON}")
        if not isinstance(signatures.get(key), str):
            raise UserError(f"{path}: no signature of '{key}' (signature.{key}); {EVALUATE_JSON}")
        scores[key] = float(data[key])
    n = data.get("n_sentences")
    if n is not None and not (isinstance(n, int) and not isinstance(n, bool) and n >= 0):
        raise UserError(f"{path}: 'n_sentences' is {str(n)[:40]!r}, not a count; {EVALUATE_JSON}")
    kept = {key: signatures[key] for key, _ in METRICS if scores[key] is not None}
    return Evaluation(name, scores["bleu"], scores["chrf"], kept, n, scores["ter"])


def run_directory(checkpoint: Path) -> Path:
    """The run directory of a checkpoint: RUN/checkpoints/x.pt -> RUN; any other x.pt -> its directory."""
    parent = Path(os.path.abspath(checkpoint)).parent  # absolute: 'best.pt' still has a named directory
    return parent.parent if parent.name == "checkpoints" else parent


def _unique(items: Iterable[Any]) -> list:
    """Items in order, each once."""
    return list(dict.fromkeys(items))


def _corpora(cfg: RunConfig) -> list[CorpusConfig]:
    """The run's corpora; a run without data.corpora has one, the `data:` block itself."""
    return cfg.data.corpora or [CorpusConfig()]


def _direction(corpus: CorpusConfig, cfg: RunConfig) -> tuple[str, str]:
    return corpus.src_lang or cfg.data.src_lang, corpus.tgt_lang or cfg.data.tgt_lang


def _dataset_name(corpus: CorpusConfig, cfg: RunConfig) -> str:
    """A hub corpus' dataset id; else the corpus' own name, its directory's name, or SRC-TGT."""
    d = cfg.data
    hub_name = corpus.hub_name or d.hub_name
    if (corpus.format or d.format) == "hub" and hub_name:
        return hub_name
    if corpus.name:
        return corpus.name
    folder = Path(corpus.dir or d.dir or "").name  # the last part only: a local path says nothing on the Hub
    return folder if folder not in ("", "..") else corpus_name(corpus, d)


def count_parameters(weights: dict, share_embeddings: bool) -> int:
    """Parameters of a model's state dict, each tied matrix once.

    The state dict lists the shared embedding under two names (src_embed and tgt_embed, one tensor);
    checkpoint averaging makes them two equal tensors, so the config, not the storage, says whether
    they are one matrix. The output projection is the target embedding and has no entry of its own."""
    tied = share_embeddings and "src_embed.tokens.weight" in weights
    return sum(tensor.numel() for name, tensor in weights.items() if not (tied and name == TIED))


def best_validation(run_dir: Path) -> dict | None:
    """The record of RUN/log.jsonl with the highest valid_bleu (the first of equals, as best.pt);
    None when the log is absent, unreadable or holds no validation."""
    try:
        text = (run_dir / "log.jsonl").read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None
    best = None
    for line in text.splitlines():
        try:
            record = json.loads(line)
        except ValueError:  # a line cut short by a kill
            continue
        if isinstance(record, dict) and _number(record.get("valid_bleu")):
            if best is None or record["valid_bleu"] > best["valid_bleu"]:
                best = record
    return best


def front_matter(cfg: RunConfig, name: str, engine: str, evaluations: Sequence[Evaluation],
                 license: str | None) -> dict:
    """The card's metadata, with the Hub's keys; `model-index` only with evaluations (the Hub
    rejects an empty one)."""
    directions = _unique(_direction(c, cfg) for c in _corpora(cfg))
    meta: dict[str, Any] = {
        "language": _unique(lang for pair in directions for lang in pair),
        "license": license or "unknown",
        "library_name": engine,
        "tags": ["translation", "mtkit"] + (["ctranslate2"] if engine == "ctranslate2" else []),
        "datasets": _unique(_dataset_name(c, cfg) for c in _corpora(cfg)),
        "metrics": ["bleu", "chrf"],
        "pipeline_tag": "translation",
    }
    if evaluations:
        task = {"type": "translation", "name": "Translation " + ", ".join(f"{s}-{t}" for s, t in directions)}
        results = []
        for e in evaluations:
            metrics = []
            for key, label in METRICS:
                value = getattr(e, key)
                if value is None:
                    continue
                metric: dict[str, Any] = {"type": key, "value": value, "name": label}
                if e.signatures.get(key):
                    metric["args"] = {"signature": e.signatures[key]}
                metrics.append(metric)
            # a copy each: one shared dict would be dumped as a YAML anchor and aliases
            results.append({"task": dict(task), "dataset": {"name": e.dataset, "type": e.dataset},
                            "metrics": metrics})
        meta["model-index"] = [{"name": name, "results": results}]
    return meta


def _cell(text: str) -> str:
    """Text for a Markdown table cell: one line, no column breaks."""
    return " ".join(str(text).split()).replace("|", "\\|")


def _evaluation_section(evaluations: Sequence[Evaluation], fmt: str, tgt_lang: str) -> list[str]:
    if not evaluations:
        return ["## Evaluation", "",
                "No test scores are recorded in this card. To add them, score a test set with sacreBLEU "
                "and export again with `--eval NAME=FILE` (repeatable, one per test set):", "",
                "```bash",
                f"mtkit evaluate -m MODEL --src test.src --ref test.ref -l {tgt_lang} --json > eval.json",
                f"mtkit export -m MODEL --format {fmt} --eval NAME=eval.json OUT",
                "```"]
    columns = [(key, label) for key, label in METRICS
               if any(getattr(e, key) is not None for e in evaluations)]
    lines = ["## Evaluation", "",
             "sacreBLEU scores of this model on test sets (`mtkit evaluate`; TER: lower is better):", "",
             "| Test set | Sentences | " + " | ".join(label for _, label in columns) + " |",
             "|---|---:|" + "---:|" * len(columns)]
    for e in evaluations:
        cells = [_cell(e.dataset), "" if e.n_sentences is None else str(e.n_sentences)]
        cells += ["" if getattr(e, key) is None else f"{getattr(e, key):.2f}" for key, _ in columns]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Signatures:", ""]
    for e in evaluations:
        lines += [f"- {_cell(e.dataset)}, {label}: `{e.signatures[key]}`" for key, label in METRICS
                  if getattr(e, key) is not None and e.signatures.get(key)]
    return lines


def _validation_section(record: dict | None, cfg: RunConfig) -> list[str]:
    if record is None:
        return []
    step = f" at step {record['step']}" if isinstance(record.get("step"), int) else ""
    directions = record.get("directions")
    each = ""
    if isinstance(directions, dict) and directions:
        parts = [f"{name} {d['valid_bleu']:.2f}" for name, d in directions.items()
                 if isinstance(d, dict) and _number(d.get("valid_bleu"))]
        each = f" (the mean over its directions: {', '.join(parts)})" if parts else ""
    n = cfg.train.valid_bleu_sentences
    sentences = f"the first {n} sentences of " if n else ""
    return ["## Validation", "",
            f"Best validation BLEU of the training run: {record['valid_bleu']:.2f}{step}{each}. This is "
            f"mtkit's validation, sacreBLEU of beam search on {sentences}the run's valid split, by which "
            "checkpoints were chosen: not a test score."]


def _size(weights: dict, key: str) -> int | None:
    tensor = weights.get(key)
    return int(tensor.shape[0]) if tensor is not None and tensor.dim() == 2 else None


def _training_section(state: dict, cfg: RunConfig) -> list[str]:
    m, t, tok = cfg.model, cfg.train, cfg.tokenizer
    model = (f"{m.n_layers} encoder and {m.n_layers} decoder layers, d_model {m.d_model}, d_ff {m.d_ff}, "
             f"{m.n_heads} heads, {m.norm}-norm, dropout {m.dropout:g}")
    if m.attention_dropout:
        model += f", attention dropout {m.attention_dropout:g}"
    if getattr(m, "activation_dropout", 0.0):
        model += f", activation dropout {m.activation_dropout:g}"
    activation = getattr(m, "activation", None)
    if activation:
        model += f", activation {activation}"
    model += f", up to {m.max_positions} positions"
    if tok.model or tok.src_model or tok.from_model:
        kind = "SentencePiece, an existing model"
    else:
        kind = f"SentencePiece {tok.type}"
    src_size, tgt_size = _size(state["model"], "src_embed.tokens.weight"), _size(state["model"], TIED)
    if tok.joint and src_size:
        vocab = f"one joint vocabulary of {src_size} pieces"
    elif src_size and tgt_size:
        vocab = f"source {src_size} and target {tgt_size} pieces"
    else:
        vocab = f"vocab_size {tok.vocab_size}"
    lines = ["## Training", "", f"- Model: {model}.", f"- Tokenizer: {kind}, {vocab}."]
    corpora = []
    for c in _corpora(cfg):
        src, tgt = _direction(c, cfg)
        extra = [f"weight {c.weight:g}"] if c.weight != 1.0 else []
        extra += [f"tag `{c.tag}`"] if c.tag else []
        corpora.append(f"{_dataset_name(c, cfg)} ({src}→{tgt}{'; ' if extra else ''}{'; '.join(extra)})")
    lines.append(f"- Data: {', '.join(corpora)}.")
    step = state.get("step")
    if isinstance(step, int):
        lines.append(f"- Steps: {step} (train.max_steps {t.max_steps}).")
    batch = (f"{t.max_tokens} tokens per batch" if t.max_tokens != "auto"
             else "max_tokens auto (set per device)")
    if t.accum_steps > 1:
        batch += f", {t.accum_steps} batches per step"
    lines.append(f"- Batches: {batch}.")
    optimizer = "AdamW" if t.weight_decay else "Adam"
    decay = f", weight decay {t.weight_decay:g}" if t.weight_decay else ""
    clip = f"; gradient norm clipped at {t.clip_norm:g}" if t.clip_norm is not None else ""
    betas = ", ".join(f"{b:g}" for b in t.adam_betas)
    schedule = "min(step^-0.5, step × warmup_steps^-1.5)"
    if t.lr_decay == "linear":
        schedule = (f"warmup_steps^-0.5 × min(step / warmup_steps, (max_steps - step) / (max_steps - "
                    f"warmup_steps)) (linear decay to 0 at max_steps {t.max_steps})")
    lines.append(f"- Optimizer: {optimizer} (betas {betas}, eps {t.adam_eps:g}{decay}), learning rate "
                 f"lr_factor {t.lr_factor:g} × d_model^-0.5 × {schedule}, "
                 f"warmup_steps {t.warmup_steps}{clip}.")
    lines.append(f"- Label smoothing: {t.label_smoothing:g}.")
    init = state.get("init_from")
    if isinstance(init, dict) and init.get("path"):
        path = Path(str(init["path"]))
        at = f", step {init['step']}" if isinstance(init.get("step"), int) else ""
        lines.append(f"- Fine-tuned from: run `{run_directory(path).name}` ({path.name}{at}).")
    averaged = state.get("averaged")
    if isinstance(averaged, list) and averaged:
        lines.append(f"- Weights: the average of {len(averaged)} checkpoints.")
    d = cfg.decode
    lines.append(f"- Decoding defaults (mtkit): beam size {d.beam_size}, length penalty {d.length_penalty:g} "
                 f"(Wu et al.), output at most source length + {d.max_len_offset} tokens.")
    return lines


def _usage_section(cfg: RunConfig, engine: str, src: str, tgt: str) -> list[str]:
    beam = cfg.decode.beam_size
    tags = _unique(c.tag for c in _corpora(cfg) if c.tag)
    prefix = cfg.decode.prefix
    lines = ["## Usage", ""]
    if engine == "transformers":
        lines.append("`MODEL_DIR` is this directory, or its repository id on the Hub.")
    else:
        lines.append("`MODEL_DIR` is this directory (`huggingface_hub.snapshot_download(repo_id)` "
                     "downloads it from the Hub).")
    if tags or prefix:
        listed = ", ".join(f"`{tag}`" for tag in tags)
        put = "put the tag to translate with and a space in front of each source sentence"
        said = f"Its training sources began with a tag ({listed}): {put}" if tags else put.capitalize()
        default = f"; mtkit's default is `{prefix}`" if prefix else ""
        lines += ["", f"{said} (`mtkit translate --prefix TAG` does so{default})."]
    hf_dir = "MODEL_DIR" if engine == "transformers" else "HF_DIR"
    lines += ["", "### Transformers", ""]
    if engine != "transformers":
        lines += ["This directory is a CTranslate2 model. For a Transformers model directory, export the "
                  "checkpoint again:", "", "```bash", "mtkit export -m MODEL --format hf HF_DIR", "```", ""]
    lines += ["```python",
              "from transformers import AutoModelForSeq2SeqLM, AutoTokenizer",
              "",
              f'tokenizer = AutoTokenizer.from_pretrained("{hf_dir}")',
              f'model = AutoModelForSeq2SeqLM.from_pretrained("{hf_dir}")',
              f'batch = tokenizer(["..."], return_tensors="pt", padding=True)  # {src} in',
              f"output = model.generate(**batch, num_beams={beam})  # the directory's generation_config.json",
              f"print(tokenizer.batch_decode(output, skip_special_tokens=True))  # {tgt} out",
              "```", "",
              "With transformers 4.x, `pipeline(\"translation\", model=...)` works too (transformers 5 "
              "removed that pipeline).", "", "### CTranslate2", ""]
    ct2_dir = "MODEL_DIR" if engine == "ctranslate2" else "CT2_DIR"
    if engine != "ctranslate2":
        lines += ["For a CTranslate2 model directory (`pip install \"mtkit[ct2]\"`), export the checkpoint "
                  "with mtkit:", "", "```bash", "mtkit export -m MODEL --format ctranslate2 CT2_DIR", "```",
                  "", "then:", ""]
    lines += ["```python",
              "import ctranslate2",
              "import sentencepiece as spm",
              "",
              f'translator = ctranslate2.Translator("{ct2_dir}")',
              f'source = spm.SentencePieceProcessor(model_file="{ct2_dir}/source.spm")',
              f'target = spm.SentencePieceProcessor(model_file="{ct2_dir}/target.spm")',
              f'results = translator.translate_batch(source.encode(["..."], out_type=str), beam_size={beam})',
              "print([target.decode(r.hypotheses[0]) for r in results])",
              "```", "", "### mtkit", ""]
    if engine == "transformers":
        lines += ["```bash",
                  "mtkit import --format hf MODEL_DIR OUT",
                  f"mtkit translate -m OUT < input.{src} > output.{tgt}",
                  "```"]
    else:
        lines += ["`mtkit.export.ct2_translate` translates with this directory as `mtkit translate` does "
                  "(its decoding defaults, from mtkit_export.json):", "",
                  "```python",
                  "from mtkit.export import ct2_translate",
                  "",
                  'print(ct2_translate("MODEL_DIR", ["..."]))',
                  "```"]
    return lines


def card_text(state: dict, checkpoint: Path, engine: str, evaluations: Sequence[Evaluation] = (),
              license: str | None = None) -> str:
    """The README.md text of a model exported from `state` (a loaded checkpoint) for `engine`
    ("transformers" or "ctranslate2"), with the test scores `evaluations` and `license` (default
    "unknown"); `checkpoint` is where the state was loaded from, which locates the run's log.jsonl."""
    if engine not in ENGINES:
        raise ValueError(f"engine {engine!r}: one of {', '.join(ENGINES)}")
    checkpoint = Path(checkpoint)
    cfg = config_from_dict(state["config"], str(checkpoint))
    run_dir = run_directory(checkpoint)
    name = run_dir.name or checkpoint.stem
    m = cfg.model
    directions = _unique(_direction(c, cfg) for c in _corpora(cfg))
    src, tgt = directions[0]
    params = count_parameters(state["model"], m.share_embeddings)
    norm = ("post-norm (LayerNorm after each residual sum, as in the paper)" if m.norm == "post"
            else "pre-norm (LayerNorm before each sublayer, and after each stack)")
    embeddings = ("source, target and output embeddings shared" if m.share_embeddings
                  else "separate source and target embeddings, the output projection tied to the target's")
    if getattr(m, "output_bias", False):
        embeddings += ", an output bias"
    engine_name = "Transformers" if engine == "transformers" else "CTranslate2"
    what = (f"A Transformer encoder-decoder (\"Attention Is All You Need\", Vaswani et al., 2017) trained "
            f"with mtkit to translate {', '.join(f'{s}→{t}' for s, t in directions)}: {m.n_layers} encoder "
            f"and {m.n_layers} decoder layers, d_model {m.d_model}, d_ff {m.d_ff}, {m.n_heads} attention "
            f"heads, {norm}, sinusoidal positions, {embeddings}; {params:,} parameters. This directory "
            f"holds it as a {engine_name} model.")
    meta = front_matter(cfg, name, engine, evaluations, license)
    # no line wrapping: long values (signatures) stay on one line, as a reader expects them
    header = yaml.safe_dump(meta, sort_keys=False, allow_unicode=True, width=1_000_000)
    body = [f"# {name}", "", what, ""]
    body += _evaluation_section(evaluations, ENGINES[engine], tgt) + [""]
    validation = _validation_section(best_validation(run_dir), cfg)
    body += validation + [""] if validation else []
    body += _training_section(state, cfg) + [""]
    body += _usage_section(cfg, engine, src, tgt)
    return f"---\n{header}---\n\n" + "\n".join(body).rstrip("\n") + "\n"
