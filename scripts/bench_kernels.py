"""Micro-benchmark of the CPU decoding backend's pieces (mtkit.inference.cpu): each piece against what
it replaces, on decoding-step shapes of a beam search (n sentences x beam 4 rows, 4 heads, d_k 64)
and on encoder shapes up to 256 x 256, with 1 thread and with all threads.

    python scripts/bench_kernels.py [--threads N] [--min-time 0.2] [--rounds 5] [--sentences 45]
        [--out results/bench_kernels.json]

Each row times the real functions: a threshold of cpu.py (MATH_ATTENTION_MAX, SMALL_BMM, SMALL_SOFTMAX)
is lifted or lowered while a side is timed, so both sides run cpu.py's own code paths. Time per call:
the median of torch.utils.benchmark blocked_autorange, the two sides alternated over --rounds rounds,
median of the rounds. "speed-up" = baseline time / piece time (above 1: the piece pays off);
"used" = whether cpu.py's threshold picks the piece at that shape. Prints a table on stdout, logs on
stderr, writes the figures as JSON. Not measured: tune_process (glibc allocator tuning), which acts
on the whole process, cannot be undone within it, and pays off on the allocation pattern of whole
decoding steps (docs/performance.md).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils.benchmark import Timer

import mtkit.inference.cpu as cpu
from benchlib import finish, machine
from mtkit.inference import Backend
from mtkit.model import sdpa

log = logging.getLogger("bench_kernels")
HEADS, D_K, BEAM = 4, 64, 4
FLAGS = ("avx512_bf16", "amx_bf16", "avx512f", "avx2")
LIFT = 10**9  # a threshold no shape reaches
rand = torch.randn


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=os.cpu_count(),
                   help="the 'all threads' count (default: the cores)")
    p.add_argument("--min-time", type=float, default=0.2, help="seconds per timed block (default 0.2)")
    p.add_argument("--rounds", type=int, default=5, help="alternated rounds per side (default 5)")
    p.add_argument("--sentences", type=int, default=45, help="sentences per batch, n (default 45)")
    p.add_argument("--out", type=Path, default=Path("results/bench_kernels.json"), help="JSON result file")
    args = p.parse_args(argv)
    for name in ("threads", "rounds", "sentences"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1")
    return args


@contextlib.contextmanager
def patched(values: dict):
    """cpu.py's module constants set to `values` for the duration (restored after)."""
    old = {name: getattr(cpu, name) for name in values}
    vars(cpu).update(values)
    try:
        yield
    finally:
        vars(cpu).update(old)


def pad_mask(batch: int, keys: int) -> torch.Tensor:
    """A source padding mask (batch, 1, 1, keys): the last quarter of every other row padded."""
    mask = torch.ones(batch, 1, 1, keys, dtype=torch.bool)
    mask[::2, ..., keys - keys // 4:] = False
    return mask


def cases(n: int) -> list[dict]:
    """Every comparison: group, case, shape, the piece and the baseline as (function, patches), used."""
    rows, out = n * BEAM, []

    def add(group, case, shape, piece, base, used, check: bool | None = None):
        """check: whether both sides' outputs agree; None: compare them here."""
        out.append({"group": group, "case": case, "shape": shape, "piece": piece, "base": base, "used": used,
                    "check": check})

    attention = [*((f"self-attention step {t}", rows, 1, t, False) for t in (1, 8, 30, 60)),
                 *((f"cross-attention, {s} source", n, BEAM, s, True) for s in (20, 60)),
                 ("encoder 20 x 20", n, 20, 20, True), ("encoder 50 x 50", n, 50, 50, True),
                 ("encoder 64 x 64", n, 64, 64, True), ("encoder 128 x 128", 16, 128, 128, True),
                 ("encoder 256 x 256", 16, 256, 256, True)]
    for case, b, lq, lk, masked in attention:
        q, k, v = rand(b, HEADS, lq, D_K), rand(b, HEADS, lk, D_K), rand(b, HEADS, lk, D_K)
        m = pad_mask(b, lk) if masked else None
        add("attention: two matmuls vs SDPA", case, f"{b}x{HEADS} x {lq}x{lk}",
            (lambda q=q, k=k, v=v, m=m: cpu.cpu_attention(q, k, v, m), {"MATH_ATTENTION_MAX": LIFT}),
            (lambda q=q, k=k, v=v, m=m: sdpa(q, k, v, m), {}), lq * lk <= cpu.MATH_ATTENTION_MAX)
    for lk in (1, 2, 4, 6, 7, 8, 16):
        q, k = rand(rows, HEADS, 1, D_K), rand(rows, HEADS, lk, D_K)
        p, v = rand(rows, HEADS, 1, lk).softmax(-1), rand(rows, HEADS, lk, D_K)
        used = lk * D_K < cpu.SMALL_BMM
        for name, fn in (("scores", lambda q=q, k=k: cpu._scores(q, k)),
                         ("mix", lambda p=p, v=v: cpu._mix(p, v))):
            add("small matrices: multiply-sum vs bmm", f"{name}, {lk} keys ({lk * D_K} mult-adds)",
                f"{rows}x{HEADS} x 1x{lk} x{D_K}", (fn, {"SMALL_BMM": LIFT}), (fn, {"SMALL_BMM": 0}), used)
    for lk in (2, 4, 6, 8, 12, 15, 16, 32, 60):
        s = rand(rows, HEADS, 1, lk)
        fn = lambda s=s: cpu.softmax_(s)  # noqa: E731 (in place on the exp-sum side: values stay finite)
        with patched({"SMALL_SOFTMAX": LIFT}):
            same = torch.allclose(cpu.softmax_(s.clone()), s.softmax(-1), atol=1e-6)
        add("softmax: exp-sum vs torch softmax", f"{lk} keys", f"{rows}x{HEADS} x 1x{lk}",
            (fn, {"SMALL_SOFTMAX": LIFT}), (fn, {"SMALL_SOFTMAX": 0}), lk < cpu.SMALL_SOFTMAX, same)
    for sentences, vocab in ((n, 24000), (n, 6000), (181, 24000)):
        logp, scores = rand(sentences * BEAM, vocab).log_softmax(-1), -rand(sentences, BEAM).abs() * 5
        same = torch.equal(cpu.CPUBackend().best_candidates(logp.clone(), scores, 2 * BEAM)[0],
                           Backend().best_candidates(logp.clone(), scores, 2 * BEAM)[0])  # the values
        add("best candidates: block search vs topk of the sum", f"{sentences} sentences x {BEAM}, V {vocab}",
            f"{sentences * BEAM}x{vocab}, k {2 * BEAM}",
            (lambda lp=logp, s=scores: cpu.CPUBackend().best_candidates(lp, s, 2 * BEAM), {}),
            (lambda lp=logp, s=scores: Backend().best_candidates(lp, s, 2 * BEAM), {}),
            cpu._blocks(vocab) is not None, same)  # timed: the baseline adds to logp in place, as in search
    for lk in (20, 60):
        q, m = rand(n, HEADS, BEAM, D_K), pad_mask(n, lk)
        k, v = rand(n, HEADS, lk, D_K), rand(n, HEADS, lk, D_K)
        (kt, vt), (kc, vc) = cpu.CPUBackend().memory_kv(k, v), Backend().memory_kv(k, v)
        add("encoder keys: transposed vs contiguous", f"cross-attention, {lk} source",
            f"{n}x{HEADS} x {BEAM}x{lk}",
            (lambda q=q, k=kt, v=vt, m=m: cpu.cpu_attention(q, k, v, m), {}),
            (lambda q=q, k=kc, v=vc, m=m: cpu.cpu_attention(q, k, v, m), {}), True)
    return out


def busy_s() -> float:
    """CPU seconds all processes (and, as steal, other guests) have used so far, from /proc/stat."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    return (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")  # all but idle and iowait


def call(side: tuple, threads: int = 0, min_time: float = 0.0):
    """Run one side once (threads 0), or its median seconds per call on `threads` threads."""
    fn, patches = side
    with patched(patches):
        if not threads:
            return fn()
        timer = Timer("fn()", globals={"fn": fn}, num_threads=threads)
        return timer.blocked_autorange(min_run_time=min_time).median


def run(args: argparse.Namespace) -> dict:
    torch.manual_seed(0)
    load_start = os.getloadavg()
    threads = sorted({1, args.threads})
    results = []
    for c in cases(args.sentences):
        same = c["check"]
        if same is None:
            same = torch.allclose(call(c["piece"]), call(c["base"]), atol=1e-5, rtol=1e-4)
        for t in threads:
            piece, base = [], []
            start, busy, own = time.perf_counter(), busy_s(), sum(os.times()[:2])
            for _ in range(args.rounds):
                piece.append(call(c["piece"], t, args.min_time))
                base.append(call(c["base"], t, args.min_time))
            p, b = statistics.median(piece), statistics.median(base)
            others = (busy_s() - busy - sum(os.times()[:2]) + own) / (time.perf_counter() - start)
            results.append({"group": c["group"], "case": c["case"], "shape": c["shape"], "threads": t,
                            "piece_us": p * 1e6, "baseline_us": b * 1e6, "speedup": b / p, "used": c["used"],
                            "same_output": bool(same), "others_cores": max(others, 0.0),
                            "piece_rounds_us": [x * 1e6 for x in piece],
                            "baseline_rounds_us": [x * 1e6 for x in base]})
            log.info("%s | %s | %d threads: %.1f vs %.1f us", c["group"], c["case"], t, p * 1e6, b * 1e6)
    flags = sorted(set(Path("/proc/cpuinfo").read_text().split()) & set(FLAGS))
    thresholds = {name: getattr(cpu, name) for name in ("MATH_ATTENTION_MAX", "SMALL_BMM", "SMALL_SOFTMAX")}
    return {"benchmark": "kernels", "machine": {**machine("cpu"), "cpu_flags": flags},
            "load_average": {"start": load_start, "end": os.getloadavg()}, "thresholds": thresholds,
            "setup": {"threads": threads, "min_time_s": args.min_time, "rounds": args.rounds,
                      "sentences": args.sentences, "beam": BEAM, "heads": HEADS, "d_k": D_K},
            "speedup": "baseline time / piece time (above 1: the piece is faster)",
            "not_measured": "tune_process (process-wide allocator tuning, not measurable in isolation)",
            "results": results, "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def report(result: dict) -> str:
    m, s, load = result["machine"], result["setup"], result["load_average"]
    lines = [f"bench_kernels: {m['cpu']} ({' '.join(m['cpu_flags'])}), torch {m['torch']}, "
             f"threads {s['threads']}, 1-min load {load['start'][0]:.2f} at start, {load['end'][0]:.2f} "
             f"at end | thresholds {result['thresholds']}"]
    group = None
    for r in result["results"]:
        if r["group"] != group:
            group = r["group"]
            lines += ["", group, f"  {'case':<34} {'shape':<22} {'thr':>3} {'piece us':>10} "
                      f"{'base us':>10} {'speed-up':>8} {'used':>5} {'same':>5} {'others':>6}"]
        used, same = "yes" if r["used"] else "no", "yes" if r["same_output"] else "NO"
        lines.append(f"  {r['case']:<34} {r['shape']:<22} {r['threads']:>3} {r['piece_us']:>10.1f} "
                     f"{r['baseline_us']:>10.1f} {r['speedup']:>7.2f}x {used:>5} {same:>5} "
                     f"{r['others_cores']:>6.2f}")
    lines.append("\nspeed-up = baseline / piece time (above 1: the piece is faster); used = cpu.py picks the "
                 "piece at that shape;\nothers = cores other processes used meanwhile (/proc/stat; above "
                 "about 0.1 the row was disturbed)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="bench_kernels: %(message)s")
    return finish("bench_kernels", lambda: run(args), report, args.out)


if __name__ == "__main__":
    sys.exit(main())
