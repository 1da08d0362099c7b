"""How `mtkit serve` holds up under concurrent clients, against the CLI's batch throughput.

Starts `mtkit serve` on a free loopback port, then for each client count runs that many concurrent
clients, each sending single sentences of test_2016_flickr (one POST per sentence) until the
sentences or the time per level run out; reports sentences/s and p50/p95/p99 latency per client
count. In the same run (the server stopped first, so the two never share the CPU) it times the
CLI's batch translation of the same sentences (`Translator.translate`, as `mtkit translate` runs it,
model loading excluded). "ratio" = serve throughput at 32 clients / CLI batch throughput.

    python3 scripts/bench_serve.py -m runs/quickstart [--clients 1 8 32 128] [--sentences 1000]
        [--seconds 60] [--out results/bench_serve.json]

The clients run on the same machine as the server and take some of its CPU.
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

from benchlib import finish, machine
from mtkit.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("MTKIT_DATA", ROOT.parent / "shared" / "data" / "multi30k"))
CLI_TIMER = """
import json, sys, time
from mtkit.translate import Translator
lines = [line.rstrip("\\n") for line in open(sys.argv[2], encoding="utf-8")]
translator = Translator.load(sys.argv[1], "auto")
translator.translate(lines[:16])  # warm-up, as the server's first requests are
start = time.perf_counter()
out = translator.translate(lines)
print(json.dumps({"seconds": time.perf_counter() - start, "lines": len(out)}))
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered)) - 1))]


async def load_level(url: str, sentences: list[str], clients: int, seconds: float) -> dict:
    """`clients` concurrent clients sending one sentence per request until the sentences or the time
    run out: throughput and latency."""
    import httpx

    todo = iter(sentences)
    latencies: list[float] = []
    errors = 0
    deadline = time.perf_counter() + seconds

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal errors
        for sentence in todo:
            if time.perf_counter() > deadline:
                return
            start = time.perf_counter()
            response = await http.post(f"{url}/v1/translate", json={"text": sentence})
            if response.status_code == 200:
                latencies.append(time.perf_counter() - start)
            else:
                errors += 1

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(timeout=120, limits=limits) as http:
        start = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(clients)))
        elapsed = time.perf_counter() - start
    return {"clients": clients, "sentences": len(latencies), "errors": errors, "seconds": round(elapsed, 3),
            "sentences_per_s": round(len(latencies) / elapsed, 2),
            "p50_ms": round(1000 * statistics.median(latencies), 1) if latencies else None,
            "p95_ms": round(1000 * percentile(latencies, 95), 1) if latencies else None,
            "p99_ms": round(1000 * percentile(latencies, 99), 1) if latencies else None}


def serve_levels(model: str, sentences: list[str], levels: list[int], seconds: float,
                 extra: list[str]) -> dict:
    import httpx

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    command = [sys.executable, "-m", "mtkit", "serve", "-m", model, "--port", str(port), *extra]
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while True:
            if proc.poll() is not None:
                raise UserError(f"mtkit serve -m {model} exited with {proc.returncode}")
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.time() > deadline:
                raise UserError("mtkit serve did not get ready in 120 s")
            time.sleep(0.2)
        asyncio.run(load_level(url, sentences[:16], 4, 60))  # warm-up
        results = {}
        for clients in levels:
            results[str(clients)] = level = asyncio.run(load_level(url, sentences, clients, seconds))
            print(f"bench_serve: {clients} clients: {level['sentences_per_s']} sentences/s, "
                  f"p99 {level['p99_ms']} ms", file=sys.stderr)
        results["batches"] = httpx.get(f"{url}/health", timeout=5).json()
        return results
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()


def cli_batch(model: str, sentences: list[str], tmp: Path) -> dict:
    """The CLI's batch translation of the same sentences, in a process of its own."""
    tmp.write_text("\n".join(sentences) + "\n", encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    out = subprocess.run([sys.executable, "-c", CLI_TIMER, model, str(tmp)], env=env, capture_output=True,
                         text=True, check=True)
    timing = json.loads(out.stdout.strip().splitlines()[-1])
    return {"sentences": timing["lines"], "seconds": round(timing["seconds"], 3),
            "sentences_per_s": round(timing["lines"] / timing["seconds"], 2)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("-m", "--model", default="runs/quickstart", help="checkpoint or run directory")
    p.add_argument("--src", type=Path, default=DATA / "test_2016_flickr.de.gz", help="sentences to send")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32, 128], help="client counts")
    p.add_argument("--sentences", type=int, default=1000, help="sentences per client count at most")
    p.add_argument("--seconds", type=float, default=60.0, help="seconds per client count at most")
    p.add_argument("--max-wait-ms", type=float, default=None, help="passed to mtkit serve")
    p.add_argument("--out", type=Path, default=Path("results/bench_serve.json"), help="JSON result file")
    args = p.parse_args()

    def run() -> dict:
        if not args.src.is_file():
            raise UserError(f"{args.src}: not found (set MTKIT_DATA or --src)")
        opener = gzip.open if args.src.suffix == ".gz" else open
        with opener(args.src, "rt", encoding="utf-8") as f:
            sentences = [line.strip() for line, _ in zip(f, range(args.sentences)) if line.strip()]
        extra = ["--max-wait-ms", str(args.max_wait_ms)] if args.max_wait_ms is not None else []
        serve = serve_levels(args.model, sentences, args.clients, args.seconds, extra)
        cli = cli_batch(args.model, sentences, args.out.with_suffix(".src.txt"))
        at32 = serve.get("32", {}).get("sentences_per_s")
        return {"machine": machine("cpu"), "model": args.model, "sentences": len(sentences),
                "serve": serve, "cli_batch": cli,
                "ratio": round(at32 / cli["sentences_per_s"], 3) if at32 else None}

    def report(r: dict) -> str:
        rows = [f"bench_serve: {r['model']} | {r['sentences']} sentences of {args.src.name}, one per "
                f"request | {r['machine']['cpu']}, {r['machine']['cpu_cores']} cores",
                "", f"{'clients':>8} {'sent/s':>9} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} {'errors':>7}"]
        for clients in args.clients:
            level = r["serve"][str(clients)]
            rows.append(f"{clients:>8} {level['sentences_per_s']:>9.1f} {level['p50_ms']:>8} "
                        f"{level['p95_ms']:>8} {level['p99_ms']:>8} {level['errors']:>7}")
        rows += ["", f"CLI batch: {r['cli_batch']['sentences_per_s']:.1f} sentences/s "
                 f"({r['cli_batch']['seconds']} s for {r['cli_batch']['sentences']})",
                 f"ratio (serve at 32 clients / CLI batch): {r['ratio']}"]
        return "\n".join(rows)

    return finish("bench_serve", run, report, args.out)


if __name__ == "__main__":
    sys.exit(main())
