"""What every `scripts/bench_*.py` reports about where it ran."""

from __future__ import annotations

import json
import os
import platform
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from mtkit.errors import UserError


def machine(device: str | torch.device) -> dict:
    """CPU model, cores and torch threads, versions, and the GPU's name on CUDA."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"cpu": cpu, "cpu_cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version()}
    if torch.device(device).type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info


def publish(table: str, result: dict, out: Path) -> None:
    """The human-readable table on stdout, the figures as JSON in `out`."""
    print(table)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {out}", file=sys.stderr)


def finish(name: str, run: Callable[[], dict], report: Callable[[dict], str], out: Path) -> int:
    """Run a benchmark and publish it; a user mistake is one error line and exit code 2."""
    try:
        result = run()
    except UserError as exc:
        print(f"{name}: error: {exc}", file=sys.stderr)
        return 2
    publish(report(result), result, out)
    return 0
