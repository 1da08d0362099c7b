"""Prepare-scaling benchmark: `mtkit prepare` on corpora of growing size made by repeating and
perturbing Multi30k, with wall time and peak memory of the whole process tree (workers included),
then the start of `mtkit train` on each prepared corpus (time to the first optimizer step, memory).

    python scripts/bench_prepare.py [--sizes 2000000 8000000] [--out results/bench_prepare.json]
        [--data DIR] [--workdir DIR] [--config configs/quickstart_cpu.yaml] [--set KEY=VALUE ...]
        [--sample 2000000] [--train-starts 2] [--keep]

Run from the repository root. What it shows: peak memory that does not grow with the corpus (the
SentencePiece sample, the chunks in flight and the batching pool are bounded), time that grows at
most linearly, and a training start that scans nothing. Linux only (memory is read from /proc).
Prints a table on stdout, logs on stderr, writes the figures as JSON (`"runs"`: pairs, seconds,
peak_rss_mb per size). No peer runs: no other toolkit prepares the same way in this environment.
"""

from __future__ import annotations

import argparse
import gzip
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from benchlib import machine, publish
from mtkit.io import open_text

log = logging.getLogger("bench_prepare")

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = os.environ.get("MTKIT_TEST_DATA", str(ROOT.parent / "shared" / "data" / "multi30k"))
DEFAULT_CONFIG = "configs/quickstart_cpu.yaml"
LANGS = ("de", "en")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[2_000_000, 8_000_000],
                   help="corpus sizes in pairs")
    p.add_argument("--out", type=Path, default=Path("results/bench_prepare.json"), help="JSON result file")
    p.add_argument("--data", type=Path, default=Path(DEFAULT_DATA),
                   help="Multi30k directory with train/val.{de,en}.gz "
                        "(default $MTKIT_TEST_DATA or ../shared/data/multi30k)")
    p.add_argument("--workdir", type=Path, default=Path("/tmp/mtkit_bench_prepare"),
                   help="where corpora, prepared directories and runs go (default /tmp/mtkit_bench_prepare)")
    p.add_argument("--config", default=DEFAULT_CONFIG, help=f"run config (default {DEFAULT_CONFIG})")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="more config overrides for prepare and train (repeatable)")
    p.add_argument("--sample", type=int, default=2_000_000,
                   help="tokenizer.input_sentence_size: sentences SentencePiece trains on (default 2000000)")
    p.add_argument("--train-starts", type=int, default=2,
                   help="times to start training on each prepared corpus (0: none; default 2, cold and warm)")
    p.add_argument("--keep", action="store_true", help="keep the prepared directories and runs")
    args = p.parse_args(argv)
    if min(args.sizes) < 1 or args.sample < 1 or args.train_starts < 0:
        p.error("--sizes and --sample must be >= 1, --train-starts >= 0")
    return args


def _read(path: Path) -> list[str]:
    with open_text(path) as f:
        return f.read().split("\n")[:-1]


def _perturb(words: list[str], drop: int | None, swap: int | None, number: str | None, at: float) -> str:
    """Drop a word, swap two neighbours, insert a number: made-up but plausible variation."""
    words = list(words)
    if drop is not None and len(words) > 3:
        del words[drop % len(words)]
    if swap is not None and len(words) > 1:
        i = swap % (len(words) - 1)
        words[i], words[i + 1] = words[i + 1], words[i]
    if number is not None:
        words.insert(int(at * (len(words) + 1)), number)
    return " ".join(words)


def make_corpus(data: Path, out: Path, pairs: int, seed: int = 0) -> float:
    """train.{de,en}.gz of `pairs` perturbed Multi30k pairs (deterministic) and Multi30k's val;
    seconds taken."""
    done = out / "DONE"
    if done.is_file() and done.read_text() == f"{pairs} {seed}\n":
        return 0.0
    start = time.time()
    out.mkdir(parents=True, exist_ok=True)
    base = [[line.split() for line in _read(data / f"train.{lang}.gz")] for lang in LANGS]
    rng = np.random.default_rng(seed)
    with (gzip.open(out / "train.de.gz", "wt", encoding="utf-8", compresslevel=1) as f_de,
          gzip.open(out / "train.en.gz", "wt", encoding="utf-8", compresslevel=1) as f_en):
        files = (f_de, f_en)
        for first in range(0, pairs, 100_000):
            n = min(100_000, pairs - first)
            pick = rng.integers(0, len(base[0]), n)
            ops = rng.random((n, 6))  # per pair: drop?, swap? on each side, number?, where
            positions = rng.integers(0, 1000, (n, 4))
            numbers = rng.integers(0, 100_000, n)
            for side, f in enumerate(files):
                lines = []
                for k in range(n):
                    drop = positions[k, side] if ops[k, side] < 0.5 else None
                    swap = positions[k, 2 + side] if ops[k, 2 + side] < 0.3 else None
                    number = str(numbers[k]) if ops[k, 4] < 0.5 else None  # the same number on both sides
                    lines.append(_perturb(base[side][pick[k]], drop, swap, number, ops[k, 5]))
                f.write("".join(f"{line}\n" for line in lines))
    for lang in LANGS:
        shutil.copyfile(data / f"val.{lang}.gz", out / f"val.{lang}.gz")
    done.write_text(f"{pairs} {seed}\n")
    return time.time() - start


def _tree(root: int) -> list[int]:
    """root and all its descendants, from /proc."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            parents.setdefault(ppid, []).append(int(entry))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(parents.get(pid, []))
    return found


def _kb(path: str, key: str) -> int:
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(key):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


@dataclass
class Peak:
    """Peaks of the process tree's memory, sampled from /proc."""

    rss_kb: int = 0  # sum of resident set sizes (counts shared pages once per process: an upper bound)
    pss_kb: int = 0  # sum of proportional set sizes (shared pages split between sharers)
    single_kb: int = 0  # the largest single process
    processes: int = 0

    def sample(self, root: int) -> None:
        pids = _tree(root)
        rss = [_kb(f"/proc/{pid}/status", "VmRSS:") for pid in pids]
        pss = sum(_kb(f"/proc/{pid}/smaps_rollup", "Pss:") for pid in pids)
        self.rss_kb, self.pss_kb = max(self.rss_kb, sum(rss)), max(self.pss_kb, pss)
        self.single_kb, self.processes = (max(self.single_kb, max(rss, default=0)),
                                          max(self.processes, len(pids)))

    def as_mb(self) -> dict:
        return {"peak_rss_mb": round(self.rss_kb / 1024, 1), "peak_pss_mb": round(self.pss_kb / 1024, 1),
                "peak_single_process_rss_mb": round(self.single_kb / 1024, 1), "processes": self.processes}


def watch(cmd: list[str], log_path: Path, until=None, interval: float = 0.2) -> tuple[int, float, Peak]:
    """Run cmd (stderr to log_path), sampling its tree's memory; stop it with SIGINT once until() holds.
    Returns the exit code, the seconds until it ended or until() held, and the memory peaks."""
    peak, start = Peak(), time.time()
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    with open(log_path, "wb") as err:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=err, env=env)
        stop = threading.Event()

        def sampler() -> None:
            while not stop.is_set():
                peak.sample(proc.pid)
                stop.wait(interval)

        thread = threading.Thread(target=sampler, daemon=True)
        thread.start()
        seconds = None
        while proc.poll() is None:
            if until is not None and until():
                seconds = time.time() - start
                proc.send_signal(signal.SIGINT)
                proc.wait()
                break
            time.sleep(0.05)
        seconds = seconds if seconds is not None else time.time() - start
        stop.set()
        thread.join()
    return proc.returncode, seconds, peak


def _tail(path: Path, lines: int = 5) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def bench_prepare(args: argparse.Namespace, pairs: int, corpus: Path) -> dict:
    """One `mtkit prepare` run on the corpus of `pairs` pairs."""
    prepared = args.workdir / f"prepared-{pairs}"
    sets = [f"data.dir={corpus}", "data.format=text",
            "data.splits={train: 'train.{lang}.gz', valid: 'val.{lang}.gz'}",
            "data.src_lang=de", "data.tgt_lang=en", f"data.prepared_dir={prepared}",
            f"tokenizer.input_sentence_size={args.sample}", *args.overrides]
    cmd = ([sys.executable, "-m", "mtkit", "prepare", args.config, "--force"]
           + [a for s in sets for a in ("--set", s)])
    log_path = args.workdir / f"prepare-{pairs}.log"
    log.info("prepare %d pairs ...", pairs)
    code, seconds, peak = watch(cmd, log_path)
    if code != 0:
        raise RuntimeError(f"mtkit prepare failed ({code}):\n{_tail(log_path, 20)}")
    train = json.loads((prepared / "manifest.json").read_text())["splits"]["train"]
    log.info("prepare %d pairs: %.1f s, peak %.0f MB", pairs, seconds, peak.rss_kb / 1024)
    return {"pairs": pairs, "seconds": round(seconds, 2), **peak.as_mb(),
            "seconds_per_million_pairs": round(seconds / pairs * 1e6, 2), "kept_pairs": train["pairs"],
            "src_tokens": train["src_tokens"], "tgt_tokens": train["tgt_tokens"],
            "shards": len(train["src"]["shards"]), "dropped": train["dropped"],
            "log_tail": _tail(log_path, 4)}


def bench_train_start(args: argparse.Namespace, pairs: int, repeat: int) -> dict:
    """Launch `mtkit train` on a prepared corpus and time it to its first logged optimizer step."""
    run_dir = args.workdir / f"run-{pairs}"
    shutil.rmtree(run_dir, ignore_errors=True)
    sets = [f"data.prepared_dir={args.workdir / f'prepared-{pairs}'}", f"train.run_dir={run_dir}",
            "train.device=cpu", "train.log_every=1", "train.max_steps=1000000", "train.valid_every=1000000",
            *args.overrides]
    cmd = ([sys.executable, "-m", "mtkit", "train", args.config, "--force"]
           + [a for s in sets for a in ("--set", s)])
    log_file = run_dir / "log.jsonl"

    def first_step() -> bool:
        return log_file.is_file() and '"loss"' in log_file.read_text()

    log_path = args.workdir / f"train-{pairs}-{repeat}.log"
    code, seconds, peak = watch(cmd, log_path, until=first_step)
    if not first_step():
        raise RuntimeError(f"mtkit train ended ({code}) before its first step:\n{_tail(log_path, 20)}")
    log.info("train start on %d pairs (%d): first step after %.1f s, peak %.0f MB", pairs, repeat, seconds,
             peak.rss_kb / 1024)
    if not args.keep:
        shutil.rmtree(run_dir, ignore_errors=True)
    return {"pairs": pairs, "repeat": repeat, "seconds_to_first_step": round(seconds, 2), **peak.as_mb()}


def checks(runs: list[dict], starts: list[dict]) -> dict:
    """What the benchmark checks, as figures: memory flat in the corpus size, time at most linear."""
    small, large = min(runs, key=lambda r: r["pairs"]), max(runs, key=lambda r: r["pairs"])
    out = {"size_ratio": large["pairs"] / small["pairs"],
           "peak_rss_ratio_largest_to_smallest": round(large["peak_rss_mb"] / small["peak_rss_mb"], 3),
           "time_ratio_largest_to_smallest": round(large["seconds"] / small["seconds"], 3),
           "seconds_per_pair_ratio_largest_to_smallest": round(
               large["seconds_per_million_pairs"] / small["seconds_per_million_pairs"], 3)}
    at_2m = [r for r in runs if r["pairs"] == 2_000_000]
    if at_2m:
        out["peak_rss_under_2gb_at_2m_pairs"] = at_2m[0]["peak_rss_mb"] < 2048
    if starts:
        largest = [s for s in starts if s["pairs"] == large["pairs"]]
        out["train_start_seconds_on_largest"] = [s["seconds_to_first_step"] for s in largest]
        out["train_start_peak_rss_mb_by_pairs"] = {
            str(r["pairs"]): max(s["peak_rss_mb"] for s in starts if s["pairs"] == r["pairs"]) for r in runs}
    return out


def report(result: dict) -> str:
    header = (f"{'pairs':>10} {'seconds':>9} {'s/M pairs':>10} {'peak RSS MB':>12} {'peak PSS MB':>12} "
              f"{'largest proc MB':>16} {'procs':>6} {'kept':>10} {'shards':>7}")
    lines = ["prepare (SentencePiece on a bounded sample + encoding), process tree incl. workers", header]
    for r in result["runs"]:
        lines.append(f"{r['pairs']:>10} {r['seconds']:>9.1f} {r['seconds_per_million_pairs']:>10.1f} "
                     f"{r['peak_rss_mb']:>12.0f} {r['peak_pss_mb']:>12.0f} "
                     f"{r['peak_single_process_rss_mb']:>16.0f} {r['processes']:>6} {r['kept_pairs']:>10} "
                     f"{r['shards']:>7}")
    if result["train_start"]:
        lines += ["", "train start (launch -> first optimizer step logged, CPU)",
                  f"{'pairs':>10} {'repeat':>7} {'seconds':>9} {'peak RSS MB':>12} {'peak PSS MB':>12}"]
        for s in result["train_start"]:
            lines.append(f"{s['pairs']:>10} {s['repeat']:>7} {s['seconds_to_first_step']:>9.1f} "
                         f"{s['peak_rss_mb']:>12.0f} {s['peak_pss_mb']:>12.0f}")
    lines += ["", "checks: " + json.dumps(result["checks"])]
    return "\n".join(lines)


NOTES = [
    ("Corpora: Multi30k train pairs drawn at random (seeded) with a word dropped, neighbours swapped and a "
     "number inserted, so pairs differ; written as .gz (compresslevel 1); generation is not timed."),
    ("Memory: the process tree of `mtkit prepare` / `mtkit train` (parent and worker processes) sampled from "
     "/proc every 0.2 s; peak_rss_mb sums RSS over processes (shared pages counted per process: an upper "
     "bound), peak_pss_mb sums PSS (shared pages split)."),
    ("Train start: `mtkit train` with the same config on CPU, log_every 1, killed with SIGINT once the first "
     "optimizer step is in log.jsonl; repeat 1 right after prepare, later repeats with a warm page cache."),
]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="bench_prepare: %(message)s")
    if not (args.data / "train.de.gz").is_file():
        print(f"bench_prepare: error: Multi30k not found in {args.data} (pass --data DIR)", file=sys.stderr)
        return 2
    args.workdir.mkdir(parents=True, exist_ok=True)
    runs, starts, generation = [], [], {}
    for pairs in sorted(args.sizes):
        corpus = args.workdir / f"corpus-{pairs}"
        generation[pairs] = round(make_corpus(args.data, corpus, pairs), 1)
        runs.append(bench_prepare(args, pairs, corpus))
        starts += [bench_train_start(args, pairs, k + 1) for k in range(args.train_starts)]
        if not args.keep:
            shutil.rmtree(args.workdir / f"prepared-{pairs}", ignore_errors=True)
    result = {"benchmark": "prepare", "peer": None, "ratio": None, "config": args.config,
              "overrides": [f"tokenizer.input_sentence_size={args.sample}", *args.overrides],
              "runs": runs, "train_start": starts, "checks": checks(runs, starts),
              "corpus_generation_seconds": generation, "machine": machine("cpu"), "notes": NOTES,
              "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    publish(report(result), result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
