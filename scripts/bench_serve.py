"""How `mtkit serve` holds up under concurrent clients, against the CLI's batch throughput.

Starts `mtkit serve` on a free loopback port, then for each client count runs that many concurrent
clients, each sending single sentences of test_2016_flickr (one POST per sentence, on a keep-alive
connection of its own) until the sentences or the time per level run out; reports sentences/s and
p50/p95/p99 latency per client count. In the same run (the server stopped first, so the two never
share the CPU) it times the CLI's batch translation of the same sentences (`Translator.translate`, as
`mtkit translate` runs it, model loading excluded), and the same sentences decoded in-process in
consecutive groups of N for each client count N: the most that N one-sentence clients can get from
the decoder, with no HTTP at all. "ratio" = serve throughput at 32 clients / CLI batch throughput;
"ratio_decode_only" = that bound at 32 / CLI batch throughput.

    python3 scripts/bench_serve.py -m runs/quickstart [--clients 1 8 32 128] [--sentences 1000]
        [--seconds 60] [--out results/bench_serve.json]

The clients run on the same machine as the server and take some of its CPU, so they are written
to cost little: plain HTTP/1.1 over asyncio streams (as load generators such as wrk are), not a
full-featured client library, which on 2 cores took a third of the server's throughput.
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
result = {"seconds": time.perf_counter() - start, "lines": len(out), "groups": {}}
for n in map(int, sys.argv[3:]):
    start = time.perf_counter()
    for i in range(0, len(lines), n):
        translator.run(lines[i:i + n], 1)
    result["groups"][n] = time.perf_counter() - start
print(json.dumps(result))
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered)) - 1))]


async def post(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, path: str,
               body: bytes) -> tuple[int, bytes]:
    """One HTTP/1.1 POST on a keep-alive connection: (status, body)."""
    writer.write(b"POST %s HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (path.encode(), len(body), body))
    status_line = await reader.readline()
    if not status_line:
        raise ConnectionError("the server closed the connection")
    length = 0
    while (header := await reader.readline()) not in (b"\r\n", b""):
        name, _, value = header.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    return int(status_line.split()[1]), await reader.readexactly(length)


async def load_level(port: int, sentences: list[str], clients: int, seconds: float) -> dict:
    """`clients` concurrent clients sending one sentence per request until the sentences or the time
    run out: throughput and latency."""
    todo = iter(sentences)
    latencies: list[float] = []
    errors = 0
    deadline = time.perf_counter() + seconds

    async def client() -> None:
        nonlocal errors
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            for sentence in todo:
                if time.perf_counter() > deadline:
                    return
                start = time.perf_counter()
                try:
                    status, body = await post(reader, writer, "/v1/translate",
                                              json.dumps({"text": sentence}).encode())
                except (ConnectionError, asyncio.IncompleteReadError):
                    errors += 1
                    writer.close()
                    reader, writer = await asyncio.open_connection("127.0.0.1", port)
                    continue
                if status == 200 and json.loads(body)["translations"]:
                    latencies.append(time.perf_counter() - start)
                else:
                    errors += 1
        finally:
            writer.close()

    start = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    return {"seconds": time.perf_counter() - start, "latencies": latencies, "errors": errors}


def summary(runs: list[dict]) -> dict:
    """Sentences/s of repeated runs (median, min, max) and latency percentiles over all their requests."""
    rates = [len(r["latencies"]) / r["seconds"] for r in runs]
    latencies = [x for r in runs for x in r["latencies"]]
    ms = {f"p{q}_ms": round(1000 * percentile(latencies, q), 1) if latencies else None for q in (50, 95, 99)}
    return {"runs": len(runs), "sentences": len(latencies), "errors": sum(r["errors"] for r in runs),
            "sentences_per_s": round(statistics.median(rates), 2), "min": round(min(rates), 2),
            "max": round(max(rates), 2), **ms}


def serve_levels(model: str, sentences: list[str], levels: list[int], seconds: float, repeat: int,
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
        asyncio.run(load_level(port, sentences[:16], 4, 60))  # warm-up
        runs: dict[int, list[dict]] = {clients: [] for clients in levels}
        for _ in range(repeat):  # the levels in turn, so that a slow spell of the machine hits them all
            for clients in levels:
                runs[clients].append(run := asyncio.run(load_level(port, sentences, clients, seconds)))
                print(f"bench_serve: {clients} clients: {len(run['latencies']) / run['seconds']:.1f} "
                      "sentences/s", file=sys.stderr)
        results: dict = {str(clients): summary(level) for clients, level in runs.items()}
        results["batches"] = httpx.get(f"{url}/health", timeout=5).json()
        return results
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()


def cli_batch(model: str, sentences: list[str], groups: list[int], repeat: int, tmp: Path) -> dict:
    """The CLI's batch translation of the same sentences, and their decoding in consecutive groups of
    each size in `groups`, in a process of its own (`repeat` times: median, min, max)."""
    tmp.write_text("\n".join(sentences) + "\n", encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    timings = []
    for _ in range(repeat):
        out = subprocess.run([sys.executable, "-c", CLI_TIMER, model, str(tmp), *map(str, groups)],
                             env=env, capture_output=True, text=True, check=True)
        timings.append(json.loads(out.stdout.strip().splitlines()[-1]))

    def rates(seconds: list[float]) -> dict:
        per_s = [len(sentences) / t for t in seconds]
        return {"sentences_per_s": round(statistics.median(per_s), 2), "min": round(min(per_s), 2),
                "max": round(max(per_s), 2)}

    return {"sentences": len(sentences), "runs": repeat, **rates([t["seconds"] for t in timings]),
            "decode_only": {str(n): rates([t["groups"][str(n)] for t in timings]) for n in groups}}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("-m", "--model", default="runs/quickstart", help="checkpoint or run directory")
    p.add_argument("--src", type=Path, default=DATA / "test_2016_flickr.de.gz", help="sentences to send")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32, 128], help="client counts")
    p.add_argument("--sentences", type=int, default=1000, help="sentences per client count at most")
    p.add_argument("--seconds", type=float, default=60.0, help="seconds per client count at most")
    p.add_argument("--repeat", type=int, default=3, help="runs of each measurement (median, min, max)")
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
        if args.repeat < 1:
            raise UserError(f"--repeat {args.repeat}: expected at least 1")
        serve = serve_levels(args.model, sentences, args.clients, args.seconds, args.repeat, extra)
        cli = cli_batch(args.model, sentences, args.clients, args.repeat, args.out.with_suffix(".src.txt"))
        at32 = serve.get("32", {}).get("sentences_per_s")
        bound32 = cli["decode_only"].get("32", {}).get("sentences_per_s")
        return {"machine": machine("cpu"), "model": args.model, "sentences": len(sentences),
                "serve": serve, "cli_batch": cli,
                "ratio": round(at32 / cli["sentences_per_s"], 3) if at32 else None,
                "ratio_decode_only": round(bound32 / cli["sentences_per_s"], 3) if bound32 else None}

    def report(r: dict) -> str:
        def rate(x: dict) -> str:
            return f"{x['sentences_per_s']:.1f} ({x['min']:.1f}-{x['max']:.1f})"

        cli = r["cli_batch"]
        rows = [f"bench_serve: {r['model']} | {r['sentences']} sentences of {args.src.name}, one per "
                f"request | {r['machine']['cpu']}, {r['machine']['cpu_cores']} cores | sentences/s: median "
                f"(min-max) of {cli['runs']} runs",
                "", f"{'clients':>8} {'sent/s':>20} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} {'errors':>7} "
                f"{'decode only, sent/s':>20}"]
        for clients in args.clients:
            level = r["serve"][str(clients)]
            bound = cli["decode_only"][str(clients)]
            rows.append(f"{clients:>8} {rate(level):>20} {level['p50_ms']:>8} {level['p95_ms']:>8} "
                        f"{level['p99_ms']:>8} {level['errors']:>7} {rate(bound):>20}")
        rows += ["", f"CLI batch: {rate(cli)} sentences/s",
                 f"ratio (serve at 32 clients / CLI batch): {r['ratio']}",
                 f"ratio_decode_only (decoding in groups of 32, no HTTP / CLI batch: the most that 32 "
                 f"one-sentence clients can reach): {r['ratio_decode_only']}"]
        return "\n".join(rows)

    return finish("bench_serve", run, report, args.out)


if __name__ == "__main__":
    sys.exit(main())
