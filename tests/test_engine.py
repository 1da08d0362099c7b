"""The training step: out-of-memory split-and-retry, on-device skipping of non-finite steps, and
the search for the largest batch that fits."""

from __future__ import annotations

import copy

import numpy as np
import torch
from torch import nn

from conftest import tiny_model_config
from mtkit.config import TrainConfig
from mtkit.data.batching import collate
from mtkit.device import Precision
from mtkit.engine import ComputeContext, fit_max_tokens, make_optimizer, train_step
from mtkit.model import Transformer

V = 32
CTX = ComputeContext(torch.device("cpu"), Precision("fp32", "test"))


def batch(rows: int = 6) -> tuple[dict, int]:
    rng = np.random.default_rng(0)
    src = [rng.integers(4, V, int(rng.integers(2, 7))) for _ in range(rows)]
    tgt = [rng.integers(4, V, int(rng.integers(2, 7))) for _ in range(rows)]
    return collate(src, tgt), sum(len(t) + 1 for t in tgt)


class Failing(nn.Module):
    """The model, but out of memory for batches of more than `max_rows` rows, or non-finite."""

    def __init__(self, model: Transformer, max_rows: int | None = None, nan: bool = False):
        super().__init__()
        self.model, self.max_rows, self.nan = model, max_rows, nan

    def forward(self, src: torch.Tensor, tgt_in: torch.Tensor) -> torch.Tensor:
        if self.max_rows is not None and src.size(0) > self.max_rows:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        logits = self.model(src, tgt_in)
        return logits * float("nan") if self.nan else logits


def test_out_of_memory_splits_the_batch_and_gives_the_same_update():
    # A large Adam epsilon: the key biases get gradients of rounding noise only (softmax ignores
    # a shift shared by all keys), which eps 1e-9 would blow up into different updates.
    t = TrainConfig(adam_eps=1e-3)
    model = Transformer(tiny_model_config(), V, V)
    twin = copy.deepcopy(model)
    b, n_tokens = batch(6)
    _, parts = train_step(model, make_optimizer(model, t), [b], n_tokens, 1, 1e-2, t, CTX)
    assert parts == 1
    _, parts = train_step(Failing(twin, max_rows=2), make_optimizer(twin, t), [b], n_tokens, 1, 1e-2, t, CTX)
    assert parts == 4  # 6 rows: halves of 3 still fail, quarters of 2 fit
    for (name, a), (_, c) in zip(model.named_parameters(), twin.named_parameters()):
        torch.testing.assert_close(c, a, atol=1e-6, rtol=1e-5, msg=name)
    assert not torch.equal(model.encoder[0].ffn.w1.weight,
                           Transformer(tiny_model_config(), V, V).encoder[0].ffn.w1.weight)


def test_a_non_finite_step_is_skipped_on_the_device():
    t = TrainConfig()
    model = Transformer(tiny_model_config(), V, V)
    optimizer = make_optimizer(model, t)
    b, n_tokens = batch()
    train_step(model, optimizer, [b], n_tokens, 1, 1e-2, t, CTX)
    before = copy.deepcopy(model.state_dict())
    moments = copy.deepcopy(optimizer.state_dict()["state"])
    out, _ = train_step(Failing(model, nan=True), optimizer, [b], n_tokens, 1, 1e-2, t, CTX)
    assert out["skipped"].item() == 1.0
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key  # no NaN reached the weights
    after = optimizer.state_dict()["state"]
    assert all(torch.equal(after[k]["exp_avg"], moments[k]["exp_avg"])
               and after[k]["step"] == moments[k]["step"] for k in moments)
    out, _ = train_step(model, optimizer, [b], n_tokens, 1, 1e-2, t, CTX)
    assert out["skipped"].item() == 0.0 and torch.isfinite(out["loss"])


def test_an_fp16_overflow_skips_the_step_and_lowers_the_scale():
    t = TrainConfig()
    model = Transformer(tiny_model_config(), V, V)
    optimizer = make_optimizer(model, t)
    ctx = ComputeContext(torch.device("cpu"), Precision("fp16", "test"))
    assert ctx.scaler is not None
    b, n_tokens = batch()
    train_step(model, optimizer, [b], n_tokens, 1, 1e-2, t, ctx)  # a normal step first: Adam has state
    before = copy.deepcopy(model.state_dict())
    ctx.scaler.update(2.0**40)  # a scale whose gradients overflow fp16 (max 65504)
    out, _ = train_step(model, optimizer, [b], n_tokens, 1, 1e-2, t, ctx)
    assert out["skipped"].item() == 1.0
    assert ctx.scaler.get_scale() == 2.0**39  # halved (GradScaler's backoff)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    ctx.scaler.update(2.0**8)
    out, _ = train_step(model, optimizer, [b], n_tokens, 1, 1e-2, t, ctx)
    assert out["skipped"].item() == 0.0 and torch.isfinite(out["loss"])
    assert not torch.equal(model.encoder[0].ffn.w1.weight, before["encoder.0.ffn.w1.weight"])


def test_fit_max_tokens_finds_the_largest_budget_that_fits():
    calls = []

    def fits(budget: int) -> bool:
        calls.append(budget)
        return budget <= 5000

    found = fit_max_tokens(fits)
    assert fits(found) and 5000 * 15 / 16 <= found <= 5000
    assert len(calls) < 15
    assert fit_max_tokens(lambda b: False) == 1024
    assert fit_max_tokens(lambda b: True, high=1 << 14) == 1 << 14
