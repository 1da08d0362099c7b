"""Device and numeric precision, chosen from the hardware: on CPU bf16 only where the processor
computes it natively (AVX512-BF16 or AMX), on CUDA bf16 where the GPU has it, else fp16 with a
gradient scaler; and the versions and hardware a run records."""

from __future__ import annotations

import logging
import platform
from dataclasses import dataclass
from importlib import metadata
from typing import Literal

import torch

from mtkit.errors import UserError

log = logging.getLogger("mtkit")

PrecisionName = Literal["fp32", "bf16", "fp16"]


def pick_device(name: str = "auto") -> torch.device:
    """auto: CUDA when available, else CPU; cuda or cuda:N only when CUDA is there."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"device {name!r}: expected auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {name!r}: no CUDA device is available here")
    return device


def _cpu_flag(name: str) -> bool:
    """torch's cpuinfo query `torch.cpu._is_<name>_supported`, False where this torch lacks it."""
    query = getattr(torch.cpu, f"_is_{name}_supported", None)
    return bool(query()) if query is not None else False


def cpu_native_bf16() -> bool:
    """True where the CPU multiplies bf16 in hardware (AVX512-BF16 or AMX tiles); elsewhere
    autocast converts every bf16 matmul to and from fp32 and runs many times slower than fp32."""
    return _cpu_flag("avx512_bf16") or _cpu_flag("amx_tile")


def cuda_bf16(device: torch.device) -> bool:
    """True where the GPU computes bf16 natively (compute capability 8.0 and later)."""
    with torch.cuda.device(device):
        return torch.cuda.is_bf16_supported(including_emulation=False)


def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo on Linux), else what the platform reports."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe(device: torch.device) -> str:
    """The hardware in one phrase: 'CPU AMD EPYC (AVX2, no native bf16)' or 'CUDA NVIDIA H200 (sm_90)'."""
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return f"CUDA {torch.cuda.get_device_name(device)} (sm_{major}{minor})"
    bf16 = "native bf16" if cpu_native_bf16() else "no native bf16"
    return f"CPU {cpu_name()} ({torch.backends.cpu.get_cpu_capability()}, {bf16})"


@dataclass(frozen=True)
class Precision:
    """The numeric format a run computes in, and why it was chosen."""

    name: PrecisionName
    reason: str

    @property
    def dtype(self) -> torch.dtype | None:
        """The autocast dtype; None for plain fp32."""
        return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.name)

    @property
    def scaled(self) -> bool:
        """fp16 needs a gradient scaler: its small range underflows unscaled gradients."""
        return self.name == "fp16"


def choose_precision(requested: str, device: torch.device, key: str = "train.precision") -> Precision:
    """Resolve `auto` from the hardware; check an explicit choice against it (one warning line for
    bf16 emulated on CPU, one error line where CUDA cannot run it)."""
    hardware = describe(device)
    if device.type == "cpu":
        native = cpu_native_bf16()
        if requested == "auto":
            return (Precision("bf16", f"auto: {hardware} computes bf16 natively") if native
                    else Precision("fp32", f"auto: {hardware}, so bf16 would be emulated"))
        if requested == "fp16":
            raise UserError(f"{key}: fp16 is for CUDA GPUs; on {hardware} use auto or fp32")
        if requested == "bf16" and not native:
            log.warning("%s bf16: %s emulates bf16 in software; expect training many times slower than "
                        "in fp32, which auto picks here", key, hardware)
            return Precision("bf16", f"requested, emulated on {hardware}")
        return Precision(requested, "requested")
    if requested == "auto":
        return (Precision("bf16", f"auto: {hardware} supports bf16") if cuda_bf16(device)
                else Precision("fp16", f"auto: {hardware} has no bf16, so fp16 with a gradient scaler"))
    if requested == "bf16" and not cuda_bf16(device):
        raise UserError(f"{key}: bf16 needs a GPU of compute capability 8.0 or later; {hardware} has none "
                        "(use auto for fp16 with a gradient scaler, or fp32)")
    return Precision(requested, "requested")


def decode_precision(device: torch.device) -> Precision:
    """Decoding: fp32 on CPU (its packed fp32 and int8 paths), else as training's auto."""
    if device.type == "cpu":
        return Precision("fp32", "CPU decoding")
    return choose_precision("auto", device)


def versions() -> dict[str, str]:
    """mtkit's version and those of what it computes with, for --version and the run directory."""
    from mtkit import __version__

    found = {"mtkit": __version__, "python": platform.python_version()}
    for package in ("torch", "sentencepiece", "sacrebleu"):
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            found[package] = "not installed"
    cuda = torch.version.cuda
    found["torch_build"] = f"CUDA {cuda}" if cuda else "CPU only"
    found["torch_cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    found["cuda_available"] = str(torch.cuda.is_available())
    return found
