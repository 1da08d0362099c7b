"""Precision chosen from the hardware, with the capability checks patched to each kind of machine."""

from __future__ import annotations

import logging

import pytest
import torch

from conftest import ROOT
from mtkit import device as dev
from mtkit.config import load_config
from mtkit.device import choose_precision, decode_precision
from mtkit.errors import UserError

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


@pytest.fixture
def cpu_without_bf16(monkeypatch):
    monkeypatch.setattr(dev, "cpu_native_bf16", lambda: False)


@pytest.fixture
def cpu_with_bf16(monkeypatch):
    monkeypatch.setattr(dev, "cpu_native_bf16", lambda: True)


@pytest.fixture
def gpu(monkeypatch):
    """A CUDA device whose bf16 support the test sets: `gpu(False)` is a T4 or V100."""
    def make(bf16: bool) -> None:
        monkeypatch.setattr(dev, "cuda_bf16", lambda device: bf16)
        monkeypatch.setattr(dev, "describe", lambda device: "CUDA Tesla T4 (sm_75)" if not bf16
                            else "CUDA NVIDIA H200 (sm_90)")
    return make


def test_auto_on_a_cpu_without_native_bf16_is_fp32(cpu_without_bf16, caplog):
    with caplog.at_level(logging.WARNING, logger="mtkit"):
        chosen = choose_precision("auto", CPU)
    assert chosen.name == "fp32" and chosen.dtype is None and not chosen.scaled
    assert "emulated" in chosen.reason and not caplog.records


def test_auto_on_a_cpu_with_native_bf16_is_bf16(cpu_with_bf16):
    chosen = choose_precision("auto", CPU)
    assert chosen.name == "bf16" and chosen.dtype == torch.bfloat16 and "natively" in chosen.reason


def test_explicit_bf16_on_a_cpu_without_it_warns_once_naming_the_hardware(cpu_without_bf16, caplog):
    with caplog.at_level(logging.WARNING, logger="mtkit"):
        chosen = choose_precision("bf16", CPU)
    assert chosen.name == "bf16"  # the user's choice is kept
    assert len(caplog.records) == 1
    message = caplog.records[0].getMessage()
    assert "train.precision bf16" in message and "CPU" in message and "slower than in fp32" in message


def test_explicit_bf16_on_a_native_cpu_is_silent(cpu_with_bf16, caplog):
    with caplog.at_level(logging.WARNING, logger="mtkit"):
        assert choose_precision("bf16", CPU).name == "bf16"
    assert not caplog.records


def test_fp16_on_cpu_is_an_error():
    with pytest.raises(UserError, match="train.precision: fp16 is for CUDA"):
        choose_precision("fp16", CPU)


def test_auto_on_a_gpu_without_bf16_is_fp16_with_a_scaler(gpu):
    gpu(False)
    chosen = choose_precision("auto", CUDA)
    assert chosen.name == "fp16" and chosen.scaled and chosen.dtype == torch.float16
    assert "gradient scaler" in chosen.reason
    assert decode_precision(CUDA).name == "fp16"  # decoding follows the same rule


def test_auto_on_a_gpu_with_bf16_is_bf16(gpu):
    gpu(True)
    assert choose_precision("auto", CUDA).name == "bf16"
    assert not choose_precision("auto", CUDA).scaled


def test_explicit_bf16_on_a_gpu_without_it_is_one_error_naming_the_gpu(gpu):
    gpu(False)
    with pytest.raises(UserError, match=r"train.precision: bf16 needs .* Tesla T4"):
        choose_precision("bf16", CUDA)


def test_cpu_decoding_is_fp32_whatever_the_cpu(cpu_with_bf16):
    assert decode_precision(CPU).name == "fp32"


@pytest.mark.parametrize("config", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_no_shipped_config_forces_emulated_bf16(config, cpu_without_bf16, caplog):
    cfg = load_config(config)
    with caplog.at_level(logging.WARNING, logger="mtkit"):
        chosen = choose_precision(cfg.train.precision, CPU)
    assert chosen.name == "fp32", f"{config.name} trains in {chosen.name} on a CPU without native bf16"
    assert not caplog.records, caplog.records
