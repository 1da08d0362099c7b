"""The `mtkit` command line: argument parsing, help texts, and one-line errors with exit code 2."""

from __future__ import annotations

import functools
import json
import logging
import os
import sys
from pathlib import Path
from typing import Annotated, Literal, Optional

import typer

from mtkit.errors import UserError

# An internal error prints Python's plain traceback: never Typer's pretty one, whose boxes show the
# local variables of every frame (tensors, configs, whatever was in scope).
app = typer.Typer(no_args_is_help=True, rich_markup_mode=None, pretty_exceptions_enable=False,
                  help="mtkit: the Transformer of 'Attention Is All You Need' for machine translation.\n\n"
                       "prepare -> train -> translate -> evaluate. Logs go to stderr, data to stdout.")
log = logging.getLogger("mtkit")

ConfigArg = Annotated[Path, typer.Argument(metavar="CONFIG",
                                           help="Run config (YAML), e.g. configs/quickstart_cpu.yaml.")]
SetOpt = Annotated[Optional[list[str]], typer.Option(
    "--set", "-s", metavar="KEY=VALUE",
    help="Override a config field, KEY=VALUE (repeatable), e.g. --set model.n_layers=3.")]
ModelOpt = Annotated[Optional[Path], typer.Option(
    "--model", "-m", help="Checkpoint file, or run directory (its averaged.pt, else best.pt).")]


def _errors_to_exit(func):
    """User mistakes become one line on stderr and exit code 2; internal errors keep their traceback."""
    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except UserError as exc:
            typer.echo(f"mtkit: error: {exc}", err=True)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            typer.echo("mtkit: interrupted", err=True)
            raise typer.Exit(130) from None
        except BrokenPipeError:  # downstream closed the pipe (e.g. `| head`): stop quietly
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            raise typer.Exit(141) from None
        except OSError as exc:  # the machine said no (full disk, read-only, permissions): one line
            from mtkit.io import cause

            where = f"{exc.filename}: " if exc.filename else ""
            typer.echo(f"mtkit: error: {where}{cause(exc)}", err=True)
            raise typer.Exit(2) from None
    return wrapper


def _print_version(value: bool) -> None:
    if not value:
        return
    from mtkit.device import versions

    v = versions()
    typer.echo(f"mtkit {v['mtkit']}\n"
               f"torch {v['torch']} ({v['torch_build']}; CPU capability {v['torch_cpu_capability']}; "
               f"CUDA device available: {v['cuda_available'].lower()})\n"
               f"sentencepiece {v['sentencepiece']}\nsacrebleu {v['sacrebleu']}\npython {v['python']}")
    raise typer.Exit()


@app.callback()
def main(quiet: Annotated[bool, typer.Option("--quiet", "-q",
                                             help="Only warnings and errors on stderr.")] = False,
         version: Annotated[bool, typer.Option("--version", callback=_print_version, is_eager=True,
                                               help="Print the versions of mtkit, torch (with its "
                                                    "CUDA or CPU build), sentencepiece and sacrebleu, "
                                                    "and exit.")] = False):
    """Set up logging to stderr."""
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, stream=sys.stderr, force=True,
                        format="mtkit: %(message)s")


def _read_input(path: Path | None, errors: Literal["strict", "replace"] = "strict") -> list[str]:
    from mtkit.data.corpus import decode_lines, read_lines

    if path is None or str(path) == "-":
        return decode_lines(sys.stdin.buffer.read(), "<stdin>", errors)
    return read_lines(path, errors)


@app.command()
@_errors_to_exit
def prepare(config: ConfigArg, set_: SetOpt = None,
            force: Annotated[bool, typer.Option("--force",
                                                help="Overwrite an existing prepared directory.")] = False):
    """Read, clean, train SentencePiece and binarize a parallel corpus into data.prepared_dir."""
    from mtkit.config import load_config
    from mtkit.prepare import prepare as run_prepare

    run_prepare(load_config(config, set_ or []), force=force)


@app.command()
@_errors_to_exit
def train(config: ConfigArg, set_: SetOpt = None,
          resume: Annotated[bool, typer.Option("--resume", help=(
              "Continue the run in train.run_dir from its newest checkpoint."))] = False,
          force: Annotated[bool, typer.Option("--force", help=(
              "Start over in a used run_dir, or resume despite config changes."))] = False,
          init_from: Annotated[Optional[Path], typer.Option("--init-from", metavar="MODEL", help=(
              "Fine-tune: start from the weights of this checkpoint or run directory (same model "
              "dimensions and vocabulary) with a fresh optimizer, schedule and step counter "
              "(train.init_from)."))] = None):
    """Train a Transformer on prepared data; checkpoints, logs and curves go to train.run_dir."""
    from mtkit.config import load_config
    from mtkit.train import train as run_train

    overrides = [*(set_ or []), *([f"train.init_from={init_from}"] if init_from is not None else [])]
    if init_from is not None and resume:
        raise UserError("--init-from starts a new run from a model's weights; --resume continues this "
                        "run from its own checkpoint: give one of them")
    run_train(load_config(config, overrides), resume=resume, force=force)


def _load_translator(model: Path | None, beam: int | None, alpha: float | None, greedy: bool,
                     max_tokens: int | None, device: str, quantize: str | None = None,
                     early_exit: bool | None = None, workers: int = 1, stopping: str | None = None,
                     **decode):
    """A Translator for `model` with the options given (None: the model's decode config);
    `decode`: more DecodeConfig fields (sample, top_k, top_p, temperature, seed, prefix)."""
    import math

    from mtkit.inference.cpu import tune_process
    from mtkit.translate import Translator

    if model is None:
        raise UserError("--model/-m is required: a checkpoint file or a run directory")
    if stopping not in (None, "finished", "bound"):
        raise UserError(f"--stopping {stopping!r}: expected finished or bound")
    top_p, temperature = decode.get("top_p"), decode.get("temperature")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise UserError(f"--top-p {top_p}: expected a number in (0, 1]")
    if temperature is not None and not (math.isfinite(temperature) and temperature > 0.0):
        raise UserError(f"--temperature {temperature}: expected a positive number")
    translator = Translator.load(model, device, quantize, workers, beam_size=1 if greedy else beam,
                                 length_penalty=alpha, max_tokens=max_tokens, early_exit=early_exit,
                                 stopping=stopping, **decode)
    if translator.device.type == "cpu":
        tune_process()  # process-wide allocator tuning: this process only decodes
    return translator


BeamOpt = Annotated[Optional[int], typer.Option(
    "--beam", "-b", min=1, help="Beam size (default: the model's decode.beam_size).")]
AlphaOpt = Annotated[Optional[float], typer.Option(
    "--length-penalty", "-a", min=0.0, max=10.0,
    help="Length penalty alpha (default: decode.length_penalty).")]
GreedyOpt = Annotated[bool, typer.Option("--greedy", help="Greedy search (beam size 1).")]
MaxTokOpt = Annotated[Optional[int], typer.Option(
    "--max-tokens", min=1, help="Token budget per batch (default: decode.max_tokens).")]
DeviceOpt = Annotated[str, typer.Option(
    "--device", metavar="auto|cpu|cuda[:N]", help="Where to run: auto is CUDA when available, else CPU.")]


@app.command()
@_errors_to_exit
def translate(model: ModelOpt = None,
              input: Annotated[Optional[Path], typer.Option("--input", "-i", help=(
                  "Source text, one sentence per line, plain or .gz (default: stdin)."))] = None,
              output: Annotated[Optional[Path], typer.Option("--output", "-o", help=(
                  "Where translations go (default: stdout; a file is written whole or not at all)."))] = None,
              beam: BeamOpt = None, length_penalty: AlphaOpt = None, greedy: GreedyOpt = False,
              nbest: Annotated[int, typer.Option("--nbest", "-n", min=1, help=(
                  "Print the N best: 'index ||| translation ||| score' lines."))] = 1,
              max_tokens: MaxTokOpt = None, device: DeviceOpt = "auto",
              early_exit: Annotated[Optional[bool], typer.Option("--early-exit/--no-early-exit", help=(
                  "End a sentence when a step's best candidate is EOS, as CTranslate2 does without length "
                  "penalty (default: decode.early_exit)."))] = None,
              stopping: Annotated[Optional[str], typer.Option("--stopping", metavar="finished|bound", help=(
                  "When a sentence's beam search ends: finished, once beam-size hypotheses ended (fairseq); "
                  "bound, once no live hypothesis can beat the best ended ones (the paper's early "
                  "termination) (default: decode.stopping)."))] = None,
              quantize: Annotated[Optional[str], typer.Option("--quantize", metavar="int8", help=(
                  "Dynamic int8 quantisation of the linear layers (CPU)."))] = None,
              workers: Annotated[int, typer.Option("--workers", min=1, help=(
                  "CPU: decode this many batches at once, each in a forked process with one thread "
                  "(CTranslate2's inter_threads): faster on several cores; in fp32 the same output."))] = 1,
              window: Annotated[int, typer.Option("--window", min=1, help=(
                  "Lines read, sorted and translated at a time: output starts after the first window and "
                  "memory stays bounded on an endless pipe (1 when stdin is a terminal: each line is "
                  "answered as it is entered)."))] = 1000,
              attention: Annotated[Optional[Path], typer.Option("--attention", metavar="DIR", help=(
                  "Write each line's attention into DIR (NNNNNN: the line number, from 1; an empty line "
                  "gets nothing): png, DIR/NNNNNN.png, a heatmap with the subwords on the axes, coloured "
                  "from 0 to its largest weight; a line translated in pieces gets DIR/NNNNNN-K.png "
                  "per piece K (from 1); --attention-kind all writes NNNNNN.cross.png, NNNNNN.encoder.png "
                  "and NNNNNN.decoder.png. json and html: one file per line, every piece in it (see "
                  "--attention-format)."))] = None,
              attention_kind: Annotated[Optional[str], typer.Option(
                  "--attention-kind", metavar="cross|encoder|decoder|all", help=(
                      "What --attention draws: cross, the encoder-decoder attention (output x source; "
                      "the default); encoder, the encoder's self-attention (source x source); decoder, "
                      "the decoder's self-attention (output x <s> and output); all, a picture of "
                      "each."))] = None,
              attention_format: Annotated[Optional[str], typer.Option(
                  "--attention-format", metavar="png|html|json", help=(
                      "How --attention writes: png (default), pictures of --attention-kind, --layer and "
                      "--head; json, DIR/NNNNNN.json per line, {\"line\", \"text\", \"records\"}: "
                      "every weight of every kind, layer and head, a record per piece; html, "
                      "DIR/NNNNNN.html per line, a self-contained page (its viewer and that JSON "
                      "inlined) to open or share offline."))] = None,
              alignment: Annotated[Optional[Path], typer.Option("--alignment", metavar="FILE", help=(
                  "Write the hard alignment (argmax of the encoder-decoder attention of --layer and "
                  "--head) per line to FILE, Pharaoh format 'src-tgt' over subwords; a line translated "
                  "in pieces gets its pieces' alignments joined, numbered over the whole line."))] = None,
              layer: Annotated[int, typer.Option("--layer", help=(
                  "Layer for --attention/--alignment, from 0 (-1: the last)."))] = -1,
              head: Annotated[Optional[str], typer.Option("--head", metavar="N|avg|all", help=(
                  "Attention head for --attention/--alignment: N, one head, from 0; avg, the mean of "
                  "the heads (the default); all, every head of the layer as a grid of pictures "
                  "titled head 0, head 1, ... on one colour scale (--alignment: their mean)."))] = None,
              errors: Annotated[str, typer.Option("--errors", metavar="strict|replace", help=(
                  "Invalid UTF-8 in the input: strict stops with the line number; replace translates "
                  "it with U+FFFD and warns."))] = "strict",
              sample: Annotated[Optional[bool], typer.Option("--sample/--no-sample", help=(
                  "Draw each next token from the model's distribution instead of searching "
                  "(back-translation): one output per line, reproducible under --seed whatever "
                  "--max-tokens, --window or --workers (default: decode.sample)."))] = None,
              top_k: Annotated[Optional[int], typer.Option("--top-k", min=0, help=(
                  "Sampling: draw from the K most probable tokens only; 0: all "
                  "(default: decode.top_k)."))] = None,
              top_p: Annotated[Optional[float], typer.Option("--top-p", help=(
                  "Sampling: draw from the smallest set of tokens whose probability reaches P "
                  "(nucleus, after --top-k); 1: all (default: decode.top_p)."))] = None,
              temperature: Annotated[Optional[float], typer.Option("--temperature", help=(
                  "Sampling: divide the logits by T (<1 sharper, >1 flatter) "
                  "(default: decode.temperature)."))] = None,
              seed: Annotated[Optional[int], typer.Option("--seed", min=0, help=(
                  "Sampling: seed of the draws; a line's output depends on the seed, the model, "
                  "the line and its position in the input (default: decode.seed)."))] = None,
              prefix: Annotated[Optional[str], typer.Option("--prefix", metavar="TAG", help=(
                  "Put this tag (a piece of the vocabulary, e.g. <2en> or <BT>) in front of every "
                  "source line, as data.corpora[].tag did in training (default: "
                  "decode.prefix)."))] = None):
    """Translate text line by line: exactly one output line per input line, in order.

    Lines are split on \\n only (a CR, U+2028 or form feed inside a line stays in it); an empty
    or blank line gives an empty line; a line longer than the model's limit is cut at
    punctuation (else at the limit), translated in pieces and joined, with a warning.

    Back-translation by sampling: mtkit translate -m MODEL --sample --seed 1 < mono.txt
    """
    from mtkit.data.corpus import stream_lines
    from mtkit.outputs import Outputs, parse_head, translate_to

    if errors not in ("strict", "replace"):
        raise UserError(f"--errors {errors!r}: expected strict or replace")
    if quantize not in (None, "int8"):
        raise UserError(f"--quantize {quantize!r}: only int8 is supported")
    if (input is None or str(input) == "-") and sys.stdin.isatty():
        window = 1  # a person typing: answer each line as it is entered (fairseq-interactive does)
        log.info("translating each line as it is entered; Ctrl-D ends")
    if attention is None:
        for name, value in (("--attention-kind", attention_kind), ("--attention-format", attention_format)):
            if value is not None:
                raise UserError(f"{name} {value}: goes with --attention DIR, which is not given")
    outputs = Outputs(output, nbest, window, attention, alignment, layer, parse_head(head),
                      attention_kind or "cross", attention_format or "png")
    outputs.check()  # a misspelt option stops here, before the model loads
    if attention_kind is not None and outputs.attention_format != "png":
        log.warning("--attention-kind %s: the %s files hold every kind", attention_kind,
                    outputs.attention_format)
    lines = stream_lines(input, errors)
    with _load_translator(model, beam, length_penalty, greedy, max_tokens, device, quantize, early_exit,
                          workers, stopping, sample=sample, top_k=top_k, top_p=top_p,
                          temperature=temperature, seed=seed, prefix=prefix) as translator:
        sampling_options = [name for name, value in (("--top-k", top_k), ("--top-p", top_p),
                                                     ("--temperature", temperature), ("--seed", seed))
                            if value is not None]
        if translator.decode.sample:
            searching = [name for name, given in (("--beam", beam is not None), ("--greedy", greedy),
                                                  ("--length-penalty", length_penalty is not None),
                                                  ("--stopping", stopping is not None),
                                                  ("--early-exit", early_exit is not None)) if given]
            if searching:
                raise UserError(f"{', '.join(searching)}: options of search, and this translation samples "
                                "(--sample or decode.sample); give --no-sample to search")
            if nbest != 1:
                raise UserError(f"--nbest {nbest}: sampling draws one translation per line")
        elif sampling_options:
            raise UserError(f"{', '.join(sampling_options)}: options of sampling; add --sample")
        elif nbest > translator.decode.beam_size:
            raise UserError(f"--nbest {nbest} exceeds the beam size {translator.decode.beam_size}")
        outputs.check(translator.model)
        translate_to(translator, lines, outputs)


@app.command()
@_errors_to_exit
def evaluate(ref: Annotated[Optional[list[Path]], typer.Option("--ref", "-r", help=(
                 "Reference file (repeat for several references)."))] = None,
             hyp: Annotated[Optional[Path], typer.Option("--hyp", help=(
                 "Hypotheses file (default: stdin, unless -m is given)."))] = None,
             model: ModelOpt = None,
             src: Annotated[Optional[Path], typer.Option("--src", help=(
                 "With -m: source file to translate, then score."))] = None,
             as_json: Annotated[bool, typer.Option("--json", help=(
                 "Print one JSON object (bleu, chrf, ter, bleu_lc, signature; bootstrap "
                 "if asked)."))] = False,
             baseline: Annotated[Path | None, typer.Option("--baseline", metavar="FILE", help=(
                 "Baseline system's hypotheses: paired bootstrap test of the hypotheses against it "
                 "(sacrebleu --paired-bs), printing both systems' BLEU and chrF with bootstrap mean, "
                 "95% CI and the p-value of the difference."))] = None,
             confidence: Annotated[bool, typer.Option("--confidence", help=(
                 "95% confidence intervals of BLEU and chrF by bootstrap resampling (sacrebleu "
                 "--confidence); implied by --baseline."))] = False,
             bootstrap_samples: Annotated[int, typer.Option("--bootstrap-samples", min=1, help=(
                 "Bootstrap resamples for --baseline / --confidence (sacrebleu's default)."))] = 1000,
             seed: Annotated[int, typer.Option("--seed", min=1, help=(
                 "Seed of the resampling (sacrebleu's default; sacrebleu takes 0 as unseeded)."))] = 12345,
             language: Annotated[Optional[str], typer.Option("--language", "-l", metavar="LANG", help=(
                 "Target language (zh, ja, de, or sacrebleu's SRC-TGT pair such as en-zh): BLEU uses its "
                 "tokenizer as sacrebleu picks it: zh -> zh, ja -> ja-mecab, ko -> ko-mecab, "
                 "else 13a."))] = None,
             tokenize: Annotated[Optional[str], typer.Option("--tokenize", metavar="NAME", help=(
                 "sacreBLEU's BLEU tokenizer, overriding -l: 13a (default), intl, zh, ja-mecab, "
                 "ko-mecab, char, flores101, flores200, none, ... (an unknown name lists them "
                 "all)."))] = None,
             beam: BeamOpt = None, length_penalty: AlphaOpt = None, greedy: GreedyOpt = False,
             max_tokens: MaxTokOpt = None, device: DeviceOpt = "auto"):
    """Score translations with sacreBLEU (BLEU, chrF, TER) and print their signatures.

    BLEU tokenizes with the tokenizer of the target language (-l zh: tok:zh) or --tokenize NAME,
    everywhere BLEU is computed (bootstrap too). BLEU-lc beside them is BLEU of the lowercased text
    with the same tokenizer (13a by default: the figure tutorials report): not comparable to
    sacreBLEU. Paired significance test:
    mtkit evaluate --ref REF --hyp NEW.txt --baseline OLD.txt
    """
    from mtkit.data.corpus import read_lines
    from mtkit.evaluate import bleu_metric, bleu_tokenizer, bootstrap, check_counts, format_report, score

    if not ref:
        raise UserError("--ref is required (one or more reference files)")
    tok = bleu_tokenizer(language, tokenize)
    bleu_metric(tok, warn=False)  # a missing tokenizer package fails now, before any translating
    if language is not None:
        log.info("target language %s: BLEU tokenizer %s", language, tok)
    refs, ref_names = [read_lines(r) for r in ref], [str(r) for r in ref]
    base = (str(baseline), read_lines(baseline)) if baseline is not None else None
    if base is not None:
        check_counts(base[1], refs, (base[0], ref_names))
    if model is not None:
        if src is None:
            raise UserError("-m/--model needs --src, the source file to translate")
        sources = read_lines(src)
        if len(sources) != len(refs[0]):
            raise UserError(f"{src} has {len(sources)} lines but {ref[0]} has {len(refs[0])}: "
                            "counts must match")
        with _load_translator(model, beam, length_penalty, greedy, max_tokens, device) as translator:
            hyps, hyp_name = translator.translate(sources), f"translation of {src}"
    else:
        hyps, hyp_name = _read_input(hyp), str(hyp or "<stdin>")
    result = score(hyps, refs, names=(hyp_name, ref_names), tokenize=tokenize, lang=language)
    if base is not None or confidence:
        result["bootstrap"] = bootstrap((hyp_name, hyps), refs, ref_names, base, bootstrap_samples, seed,
                                        tokenize=tokenize, lang=language)
    if as_json:
        result.pop("bleu_detail", None)
        typer.echo(json.dumps(result))
    else:
        typer.echo(format_report(result))


@app.command()
@_errors_to_exit
def average(run_dir: Annotated[Path, typer.Argument(metavar="RUN_DIR", help=(
                "Run directory (or its checkpoints/ directory)."))],
            last: Annotated[int, typer.Option("--last", "-k", min=1, help=(
                "How many newest step checkpoints to average (the paper: 5)."))] = 5,
            output: Annotated[Optional[Path], typer.Option("--output", "-o", help=(
                "Where to write (default: RUN_DIR/checkpoints/averaged.pt)."))] = None):
    """Average the weights of the last K step checkpoints (section 6.1); translate then uses it."""
    from mtkit.checkpoint import AVERAGED, average_checkpoints, save_checkpoint, step_checkpoints

    ckpt_dir = run_dir / "checkpoints" if (run_dir / "checkpoints").is_dir() else run_dir
    steps = step_checkpoints(ckpt_dir)
    if not steps:
        raise UserError(f"{run_dir}: no step_*.pt checkpoints to average")
    chosen = steps[-last:]
    if len(chosen) < last:
        log.warning("only %d step checkpoints in %s; averaging those", len(chosen), ckpt_dir)
    target = output or ckpt_dir / AVERAGED
    save_checkpoint(average_checkpoints(chosen), target)
    log.info("averaged %s -> %s", ", ".join(p.name for p in chosen), target)


@app.command()
@_errors_to_exit
def export(out: Annotated[Path, typer.Argument(metavar="OUT", help=(
               "Directory to write the converted model to."))],
           model: ModelOpt = None,
           format: Annotated[str, typer.Option("--format", "-f", metavar="ctranslate2|hf",
                                               help="Target: CTranslate2, or Hugging Face transformers.")
                             ] = "ctranslate2",
           quantization: Annotated[Optional[str], typer.Option(
               "--quantization", metavar="int8|int8_float32|float16|...",
               help="CTranslate2 weight type (default: as trained, fp32).")] = None,
           evaluation: Annotated[Optional[list[str]], typer.Option(
               "--eval", metavar="NAME=FILE", help=(
                   "A test set's scores for the model card: FILE is what `mtkit evaluate --json` printed "
                   "(repeat for several test sets)."))] = None,
           license: Annotated[Optional[str], typer.Option(
               "--license", help="License of the model for the card (a Hub license id, e.g. cc-by-4.0).")
                              ] = None,
           force: Annotated[bool, typer.Option("--force", help="Overwrite a non-empty OUT.")] = False):
    """Convert a checkpoint for CTranslate2 (pip install "mtkit[ct2]") or Hugging Face transformers
    (pip install "mtkit[hf]"), with a model card (README.md) for the Hub."""
    from mtkit.card import card_text, read_evaluation
    from mtkit.checkpoint import load_checkpoint, resolve_model

    if format not in ("ctranslate2", "hf"):
        raise UserError(f"--format {format!r}: ctranslate2 or hf")
    if format != "ctranslate2" and quantization:
        raise UserError("--quantization is for --format ctranslate2")
    if model is None:
        raise UserError("--model/-m is required: a checkpoint file or a run directory")
    evaluations = [read_evaluation(spec) for spec in evaluation or []]
    path = resolve_model(model)
    engine = "ctranslate2" if format == "ctranslate2" else "transformers"
    card = card_text(load_checkpoint(path), path, engine, evaluations, license)
    if format == "hf":
        from mtkit.hf import export_hf

        written = export_hf(path, out, force, card)
    else:
        from mtkit.export import export_ctranslate2

        written = export_ctranslate2(path, out, quantization, force, card)
    log.info("exported %s -> %s (%s)", model, written, engine)


@app.command("import")
@_errors_to_exit
def import_(source: Annotated[Path, typer.Argument(metavar="DIR", help=(
                "A transformers MarianMTModel directory (source.spm, target.spm, vocab.json, config.json, "
                "weights), e.g. an OPUS-MT model saved locally."))],
            out: Annotated[Path, typer.Argument(metavar="OUT", help=(
                "Directory to write the mtkit model to (model.pt, config.yaml)."))],
            format: Annotated[str, typer.Option("--format", "-f", metavar="hf",
                                                help="What DIR is: hf (Hugging Face transformers).")] = "hf",
            force: Annotated[bool, typer.Option("--force", help="Overwrite a non-empty OUT.")] = False):
    """Make an mtkit model of a transformers MarianMTModel (pip install "mtkit[hf]"): translate with
    `mtkit translate -m OUT`, fine-tune with `mtkit train CONFIG --init-from OUT`."""
    from mtkit.hf import import_hf

    if format != "hf":
        raise UserError(f"--format {format!r}: only hf is supported")
    written = import_hf(source, out, force)
    log.info("imported %s -> %s; to fine-tune it: the model section of %s, tokenizer.from_model: %s, "
             "and train --init-from %s", source, written, out / "config.yaml", out, out)


@app.command()
@_errors_to_exit
def serve(model: ModelOpt = None,
          host: Annotated[str, typer.Option("--host", help=(
              "Address to listen on (127.0.0.1: this machine only; 0.0.0.0: every interface)."))
                          ] = "127.0.0.1",
          port: Annotated[int, typer.Option("--port", min=0, max=65535, help="TCP port (0: any free one).")
                          ] = 8000,
          device: Annotated[str, typer.Option("--device", help="auto, cpu or cuda.")] = "auto",
          max_wait_ms: Annotated[float, typer.Option("--max-wait-ms", min=0, help=(
              "How long a request waits at most for others to share its batch (less once as many "
              "requests wait as the last batch had)."))] = 50.0,
          max_tokens: Annotated[Optional[int], typer.Option("--max-tokens", min=1, help=(
              "Source tokens x beam per batch (default: the model's decode.max_tokens)."))] = None,
          max_lines: Annotated[int, typer.Option("--max-lines", min=1, help="Lines per request at most.")
                               ] = 256,
          max_body: Annotated[int, typer.Option("--max-body", min=1, help="Request body bytes at most.")
                              ] = 1 << 20,
          timeout: Annotated[float, typer.Option("--timeout", min=0.1, help=(
              "Seconds a request may wait for its translation before a 503."))] = 60.0):
    """Serve a model over HTTP (pip install "mtkit[serve]"): POST /v1/translate, GET /health,
    GET /v1/models, OpenAPI docs at /docs, and at / a page that translates and shows the attention
    of every layer and head."""
    from mtkit.serve import ServeOptions, run

    if model is None:
        raise UserError("--model/-m is required: a checkpoint file or a run directory")
    run(model, ServeOptions(host=host, port=port, device=device, max_wait_ms=max_wait_ms,
                            max_tokens=max_tokens, max_lines=max_lines, max_body=max_body, timeout=timeout))


@app.command()
@_errors_to_exit
def score(model: ModelOpt = None,
          src: Annotated[Optional[Path], typer.Option("--src", help=(
              "Source sentences, one per line, plain or .gz."))] = None,
          ref: Annotated[Optional[Path], typer.Option("--ref", "-r", help=(
              "Their translations to score, line by line."))] = None,
          per_token: Annotated[bool, typer.Option("--per-token", help=(
              "Divide each score by the number of target subwords + 1 (EOS)."))] = False,
          prefix: Annotated[Optional[str], typer.Option("--prefix", metavar="TAG", help=(
              "Put this tag in front of every source line (default: decode.prefix)."))] = None,
          max_tokens: MaxTokOpt = None, device: DeviceOpt = "auto",
          output: Annotated[Optional[Path], typer.Option("--output", "-o", help=(
              "Where scores go (default: stdout; a file is written whole or not at all)."))] = None):
    """The model's log-probability of each reference line given its source line: one number per
    line pair, teacher-forced as in training (fairseq's --score-reference, marian-scorer), for
    filtering and re-ranking.

    A score is the sum of log p over the reference's subwords and EOS (no label smoothing); with
    --per-token, divided by their number. Empty lines are scored too.
    """
    from mtkit.data.corpus import read_lines
    from mtkit.device import pick_device
    from mtkit.io import write_text
    from mtkit.translate import load_model, score_pairs

    if model is None:
        raise UserError("--model/-m is required: a checkpoint file or a run directory")
    if src is None or ref is None:
        raise UserError("--src and --ref are required: the source file and the translations to score")
    sources, references = read_lines(src), read_lines(ref)
    if len(sources) != len(references):
        raise UserError(f"{src} has {len(sources)} lines but {ref} has {len(references)}: counts must match")
    net, vocab, cfg, _ = load_model(model)
    dev = pick_device(device)
    scores = score_pairs(net.to(dev), vocab, sources, references, dev, max_tokens or cfg.decode.max_tokens,
                         prefix if prefix is not None else cfg.decode.prefix, per_token, (str(src), str(ref)))
    text = "".join(f"{s:.6f}\n" for s in scores)
    if output is None or str(output) == "-":
        sys.stdout.write(text)
        sys.stdout.flush()
    else:
        write_text(output, text)


def run() -> None:
    """Console-script entry point."""
    app(prog_name="mtkit")
