"""Translation-throughput benchmark: mtkit's Translator against CTranslate2 running the same weights
(exported with mtkit.export), on the same file, in one invocation; also against
Hugging Face transformers' `generate` on the same weights (mtkit.hf) when it is installed.

    python scripts/bench_translate.py [-m runs/quickstart] [--src FILE] [--ref FILE] [--beam 4]
        [--length-penalty A] [--max-tokens N] [--repeats 3] [--lines N] [--threads N]
        [--device cpu|cuda] [--systems NAME ...] [--out results/bench_translate.json]

Prints a table on stdout, logs on stderr, writes the figures as JSON; top-level "ratio" = mtkit /
CTranslate2 sentences/s, both in float32 (above 1 = mtkit faster), with the BLEU of each output;
"ratio_transformers" = mtkit / transformers, float32, where that peer ran.
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing
import os
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

from benchlib import finish, machine
from mtkit.checkpoint import load_checkpoint, resolve_model
from mtkit.config import config_from_dict
from mtkit.data.corpus import read_lines
from mtkit.data.vocab import Vocab
from mtkit.errors import UserError
from mtkit.evaluate import score
from mtkit.export import ct2_translate, export_ctranslate2, load_ct2

# mtkit.hf imports transformers only when a model is converted: safe to import without it.
from mtkit.hf import DIFFERENCES as HF_DIFFERENCES
from mtkit.hf import INSTALL as HF_INSTALL
from mtkit.inference.cpu import tune_process
from mtkit.translate import Translator

log = logging.getLogger("bench_translate")

DEFAULT_MODEL = "runs/quickstart"
DATA = Path(os.environ.get("MTKIT_DATA",
                           Path(__file__).resolve().parents[2] / "shared" / "data" / "multi30k"))
PAUSE_S = 1.0  # between timed runs
HF = "hf float32"  # the transformers peer's system name
NOTES = [
    ("All systems get the same lines, beam size, length-penalty alpha, token budget per batch "
     "(mtkit: decode.max_tokens // beam padded source tokens; CTranslate2: batch_type tokens, "
     "max_batch_size = the same number; transformers: mtkit's length-sorted batches, padded) and threads "
     "(torch threads = CTranslate2 intra_threads, inter_threads 1; the 'inter' systems: mtkit workers = "
     "CTranslate2 inter_threads = the threads, one thread each)."),
    ("Length penalty: mtkit divides by ((5 + length) / 6) ** alpha (Wu et al. 2016), CTranslate2 by "
     "length ** alpha; the same alpha is passed to both, so beam outputs may differ (greedy ones do not)."),
    ("Length limit: mtkit source + decode.max_len_offset per sentence; CTranslate2 one limit per call, "
     "outputs cut to mtkit's per-sentence limit by mtkit.export.ct2_translate."),
    ("Timed: text in -> text out (SentencePiece, batching, search, detokenization); model loading, "
     "the CTranslate2 export and the transformers conversion are not timed. Target tokens = SentencePiece "
     "pieces of the output."),
    ("transformers: the checkpoint converted with its exact weights (mtkit.hf: PegasusForConditional"
     "Generation for pre-norm, MarianMTModel for post-norm, the model dimension permuted to their "
     "sinusoid layout), `generate` through mtkit's line pipeline, float32. Differences from mtkit: "
     + "; ".join(HF_DIFFERENCES) + "."),
]


SYSTEMS = ("mtkit fp32", "mtkit int8", "ct2 float32", "ct2 int8", "mtkit fp32 inter", "ct2 float32 inter",
           "mtkit fp32 bound")
"""'inter': one batch per thread at once, one thread each (mtkit workers = CTranslate2 inter_threads
= the thread count); the others: one batch at a time on all threads. 'bound': beam search with
decode.stopping "bound" (the paper's early termination) instead of "finished" (fairseq's)."""


@dataclass
class System:
    """One side of the comparison: a name and a function from lines to translations."""

    name: str
    translate: Callable[[list[str]], list[str]]
    settings: dict


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-m", "--model", default=DEFAULT_MODEL,
                   help=f"checkpoint or run directory (default {DEFAULT_MODEL})")
    p.add_argument("--src", type=Path, default=DATA / "test_2016_flickr.de.gz",
                   help="source file, plain or .gz (default $MTKIT_DATA/test_2016_flickr.de.gz)")
    p.add_argument("--ref", type=Path, default=DATA / "test_2016_flickr.en.gz",
                   help="reference file, plain or .gz (default $MTKIT_DATA/test_2016_flickr.en.gz)")
    p.add_argument("--beam", type=int, default=4, help="beam size for both systems (default 4)")
    p.add_argument("--length-penalty", type=float, default=None,
                   help="alpha for both systems (default the checkpoint's decode.length_penalty)")
    p.add_argument("--max-tokens", type=int, default=None,
                   help="mtkit's token budget per batch, source tokens x beam (default decode.max_tokens)")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats per system, alternated (default 3)")
    p.add_argument("--lines", type=int, default=None, help="translate only the first N lines")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for both (default torch's)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where both run (default cpu)")
    p.add_argument("--systems", nargs="+", choices=[*SYSTEMS, "hf"], default=None,
                   help="run only these (default all; mtkit fp32 and ct2 float32 always run, "
                        "they give the ratio)")
    p.add_argument("--out", type=Path, default=Path("results/bench_translate.json"), help="JSON result file")
    args = p.parse_args(argv)
    for name in ("beam", "repeats", "lines", "threads", "max_tokens"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    return args


def transformers_version() -> str | None:
    """transformers' version, or None (with the reason logged) when it cannot be imported."""
    try:
        import transformers
    except ImportError as exc:
        log.info("transformers not importable (%s)", exc)
        return None
    return transformers.__version__


def make_system(name: str, model: Path, ct2_dir: Path, settings: dict, threads: int, device: str) -> System:
    """One system by name: mtkit fp32 / int8 (Translator), CTranslate2 float32 / int8 (the export),
    transformers float32 (the checkpoint converted by mtkit.hf)."""
    torch.set_num_threads(threads)
    if name == HF:
        from mtkit.hf import hf_translate, to_transformers

        peer = to_transformers(model, device)
        run = partial(hf_translate, peer, beam_size=settings["beam_size"],
                      length_penalty=settings["length_penalty"], max_tokens=settings["max_tokens"],
                      max_len_offset=settings["max_len_offset"])
        return System(name, run, {**settings, "model_class": type(peer.model).__name__,
                                  "torch_threads": threads,
                                  "attn_implementation": peer.model.config._attn_implementation})
    inter = threads if name.endswith(" inter") else 1
    if name.startswith("mtkit"):
        quantize = "int8" if "int8" in name else None
        stopping = "bound" if name.endswith(" bound") else "finished"
        translator = Translator.load(model, device, quantize=quantize, workers=inter,
                                     beam_size=settings["beam_size"],
                                     length_penalty=settings["length_penalty"],
                                     max_tokens=settings["max_tokens"], stopping=stopping)
        if translator.device.type == "cpu":
            tune_process()  # as `mtkit translate` does
        return System(name, translator.translate, {**settings, "quantize": quantize, "workers": inter,
                                                   "threads_per_worker": threads if inter == 1 else 1,
                                                   "stopping": stopping})
    compute_type = name.split()[1]
    ct2 = load_ct2(ct2_dir, device, compute_type, threads=threads // inter, inter_threads=inter)
    run = partial(ct2_translate, ct2, beam_size=settings["beam_size"],
                  length_penalty=settings["length_penalty"], max_tokens=settings["max_tokens"],
                  max_len_offset=settings["max_len_offset"])
    return System(name, run, {**settings, "compute_type": compute_type, "intra_threads": threads // inter,
                              "inter_threads": inter})


def _worker(conn, name: str, lines: list[str], build: tuple) -> None:
    """A process of its own per system: build it, warm it up on all lines, then time a pass per request."""
    logging.disable(logging.INFO)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # exit handlers stop mtkit's worker processes
    system = make_system(name, *build)
    system.translate(lines)  # both engines prepare kernels per batch shape on first use
    conn.send("ready")
    while conn.recv() == "run":
        start = time.perf_counter()
        out = system.translate(lines)
        conn.send((time.perf_counter() - start, out, system.settings))


def benchmark(build: tuple, lines: list[str], repeats: int,
              names: tuple[str, ...]) -> tuple[dict, dict, dict]:
    """Every system in its own process (two engines in one process slowed each other by 20-30%
    here: shared allocator and thread pools), timed alternately (A B C D A B C D ...)."""
    ctx = multiprocessing.get_context("spawn")
    workers = {}
    try:
        return _alternate(ctx, workers, build, lines, repeats, names)
    finally:
        for proc, _ in workers.values():  # not daemons (mtkit's 'inter' system forks workers of its own)
            proc.terminate()


def _alternate(ctx, workers: dict, build: tuple, lines: list[str], repeats: int,
               names: tuple[str, ...]) -> tuple[dict, dict, dict]:
    for name in names:
        ours, theirs = ctx.Pipe()
        proc = ctx.Process(target=_worker, args=(theirs, name, lines, build))
        proc.start()
        theirs.close()  # a worker that dies is then an EOFError here, not a hang
        workers[name] = (proc, ours)
    for name, (_, conn) in workers.items():
        assert conn.recv() == "ready", name
        log.info("%s ready", name)
    seconds: dict[str, list[float]] = {name: [] for name in names}
    outputs, settings = {}, {}
    for r in range(repeats):
        for name, (_, conn) in workers.items():
            time.sleep(PAUSE_S)  # the last system's threads go idle first
            conn.send("run")
            secs, outputs[name], settings[name] = conn.recv()
            seconds[name].append(secs)
            log.info("repeat %d/%d %s: %.2f s", r + 1, repeats, name, secs)
    for proc, conn in workers.values():
        conn.send("stop")
        proc.join(timeout=30)
    return seconds, outputs, settings


def spread(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def summarize(secs: list[float], out: list[str], refs: list[str], reference: list[str],
              pieces: Callable) -> dict:
    """Throughput, BLEU and agreement with mtkit fp32 (`reference`) of one system."""
    n_tokens = sum(len(p) for p in pieces(out))
    bleu = score(out, [refs], metrics=("bleu",))
    return {"sentences_per_s": spread([len(out) / s for s in secs]),
            "tgt_tokens_per_s": spread([n_tokens / s for s in secs]),
            "repeat_seconds": secs, "tgt_tokens": n_tokens, "bleu": bleu["bleu"],
            "bleu_signature": bleu["signature"]["bleu"],
            "identical_to_mtkit_fp32": sum(a == b for a, b in zip(out, reference)) / max(len(out), 1)}


def ratio(systems: dict, ours: str, peer: str) -> float | None:
    if ours not in systems or peer not in systems:
        return None
    return systems[ours]["sentences_per_s"]["median"] / systems[peer]["sentences_per_s"]["median"]


def report(result: dict) -> str:
    """The human-readable table."""
    s, m = result["setup"], result["machine"]
    lines = [(f"bench_translate: {s['model']} (step {s['step']}) | {s['lines']} lines of {s['src']} | "
              f"beam {s['beam']}, alpha {s['length_penalty']}, max_tokens {s['max_tokens']} | "
              f"{s['repeats']} repeats, alternated"),
             (f"machine: {m.get('gpu') or m['cpu']}, {s['threads']} threads | peer: ctranslate2 "
              f"{result['peer']['version']}" + "".join(f" | also: {p['name']} {p['version']} {p['model']}"
                                                      for p in result["other_peers"])),
             "",
             (f"{'system':<17} {'sent/s  med [min, max]':>26} {'tgt tok/s  med [min, max]':>29} "
              f"{'BLEU':>6} {'= mtkit':>8}")]
    for name, r in result["systems"].items():
        sent, tok = r["sentences_per_s"], r["tgt_tokens_per_s"]
        lines.append(f"{name:<17} {sent['median']:>8.1f} [{sent['min']:>6.1f}, {sent['max']:>6.1f}] "
                     f"{tok['median']:>10.0f} [{tok['min']:>7.0f}, {tok['max']:>7.0f}] {r['bleu']:>6.2f} "
                     f"{r['identical_to_mtkit_fp32']:>8.1%}")
    if result["ratio"] is not None:
        per = ", ".join(f"{x:.2f}" for x in result["ratio_per_repeat"])
        lines.append(f"\nratio mtkit/ct2 sentences/s, fp32: {result['ratio']:.3f} (per repeat: {per}; "
                     "above 1 = mtkit faster)")
    if result["ratio_int8"] is not None:
        lines.append(f"ratio mtkit/ct2 sentences/s, int8: {result['ratio_int8']:.3f}")
    if result["ratio_inter"] is not None:
        lines.append("ratio mtkit/ct2 sentences/s, fp32, one batch per thread ('inter'): "
                     f"{result['ratio_inter']:.3f}")
    if result["ratio_transformers"] is not None:
        lines.append(f"ratio mtkit/transformers sentences/s, fp32: {result['ratio_transformers']:.3f}")
    lines += [f"skipped: {x}" for x in result["skipped"]]
    lines.append(f"BLEU: {next(iter(result['systems'].values()))['bleu_signature']}; '= mtkit': share of "
                 "lines identical to mtkit fp32's; CTranslate2's and transformers' length penalty is "
                 "length ** alpha, mtkit's GNMT's ((5 + length) / 6) ** alpha")
    return "\n".join(lines)


def run(args: argparse.Namespace, ct2_dir: Path) -> dict:
    """Export, build every system, time them, and assemble the result."""
    import ctranslate2

    if args.threads:
        torch.set_num_threads(args.threads)
    args.threads = torch.get_num_threads()
    path = resolve_model(args.model)
    state = load_checkpoint(path)
    decode = config_from_dict(state["config"], str(path)).decode
    decode = {"length_penalty": decode.length_penalty if args.length_penalty is None else args.length_penalty,
              "max_tokens": args.max_tokens or decode.max_tokens, "max_len_offset": decode.max_len_offset}
    src, refs = read_lines(args.src)[: args.lines], read_lines(args.ref)[: args.lines]
    if len(src) != len(refs):
        raise UserError(f"{args.src} has {len(src)} lines but {args.ref} has {len(refs)}")
    export_ctranslate2(path, ct2_dir, force=True)
    settings = {"beam_size": args.beam, **decode}
    wanted = set(args.systems or (*SYSTEMS, "hf")) | {"mtkit fp32", "ct2 float32"}
    names, skipped, other_peers = tuple(n for n in SYSTEMS if n in wanted), [], []
    hf_version = transformers_version() if "hf" in wanted else None
    if "hf" not in wanted:
        skipped.append(f"{HF}: not asked for (--systems)")
    elif hf_version is None:
        skipped.append(f"{HF}: transformers is not importable ({HF_INSTALL})")
    else:
        names += (HF,)
    seconds, outputs, used = benchmark((path, ct2_dir, settings, args.threads, args.device), src,
                                       args.repeats, names)
    if HF in used:
        other_peers.append({"name": "transformers", "version": hf_version, "model": used[HF]["model_class"],
                            "system": HF, "differences": HF_DIFFERENCES})
    tgt_spm = Vocab.from_state(state["vocab"]).tgt
    summaries = {name: summarize(seconds[name], outputs[name], refs, outputs["mtkit fp32"], tgt_spm.encode)
                 for name in seconds}
    per_repeat = [c / m for m, c in zip(seconds["mtkit fp32"], seconds["ct2 float32"])]
    setup = {"model": str(args.model), "checkpoint": str(path), "step": state.get("step"),
             "src": str(args.src), "ref": str(args.ref), "lines": len(src), "beam": args.beam, **decode,
             "repeats": args.repeats, "warmup_lines": len(src), "pause_s": PAUSE_S, "threads": args.threads,
             "device": args.device, "settings": used, "isolation": "one process per system, alternated"}
    return {"benchmark": "translate", "ratio": ratio(summaries, "mtkit fp32", "ct2 float32"),
            "ratio_metric": "sentences/s, mtkit fp32 / ctranslate2 float32 (medians)",
            "ratio_per_repeat": per_repeat, "ratio_int8": ratio(summaries, "mtkit int8", "ct2 int8"),
            "ratio_inter": ratio(summaries, "mtkit fp32 inter", "ct2 float32 inter"),
            "ratio_transformers": ratio(summaries, "mtkit fp32", HF),
            "peer": {"name": "ctranslate2", "version": ctranslate2.__version__}, "other_peers": other_peers,
            "machine": machine(args.device), "setup": setup, "systems": summaries, "skipped": skipped,
            "notes": NOTES, "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="bench_translate: %(message)s")
    try:
        import ctranslate2  # noqa: F401
    except ImportError:
        print('bench_translate: error: the peer needs CTranslate2; install it with\n'
              '    pip install "mtkit[ct2]"', file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="mtkit-ct2-") as tmp:
        return finish("bench_translate", lambda: run(args, Path(tmp) / "model"), report, args.out)


if __name__ == "__main__":
    sys.exit(main())
