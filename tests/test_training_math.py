"""The training objective and schedule against hand computations (sections 5.3 and 5.4)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mtkit.data.batching import collate, token_batches
from mtkit.data.vocab import BOS, EOS, PAD
from mtkit.engine import label_smoothed_loss
from mtkit.train import learning_rate


@pytest.mark.parametrize("step", [1, 100, 3999, 4000, 4001, 100000])
def test_learning_rate_is_the_papers_formula(step):
    expected = 512**-0.5 * min(step**-0.5, step * 4000**-1.5)
    assert learning_rate(step, 512, 4000) == pytest.approx(expected)
    assert learning_rate(step, 512, 4000, factor=2.0) == pytest.approx(2 * expected)


def test_learning_rate_peaks_at_the_end_of_warmup():
    rates = [learning_rate(s, 512, 4000) for s in range(1, 20000, 50)]
    peak = int(np.argmax(rates)) * 50 + 1
    assert abs(peak - 4000) <= 50
    assert learning_rate(4000, 512, 4000) == pytest.approx(512**-0.5 * 4000**-0.5)


def test_linear_decay_keeps_the_warmup_then_falls_in_a_straight_line_to_zero():
    peak = 0.5 * 256**-0.5 * 1000**-0.5
    for step in (1, 500, 1000):  # the warm-up and its peak are the paper's
        assert learning_rate(step, 256, 1000, 0.5, "linear", 5000) == pytest.approx(
            learning_rate(step, 256, 1000, 0.5))
    assert learning_rate(1000, 256, 1000, 0.5, "linear", 5000) == pytest.approx(peak)
    assert learning_rate(3000, 256, 1000, 0.5, "linear", 5000) == pytest.approx(peak / 2)
    assert learning_rate(4999, 256, 1000, 0.5, "linear", 5000) == pytest.approx(peak / 4000)
    assert learning_rate(5000, 256, 1000, 0.5, "linear", 5000) == 0.0
    assert learning_rate(6000, 256, 1000, 0.5, "linear", 5000) == 0.0  # past max_steps (a resumed run)
    rates = [learning_rate(s, 256, 1000, 0.5, "linear", 5000) for s in range(1000, 5001)]
    assert all(a > b for a, b in zip(rates, rates[1:]))
    assert learning_rate(3000, 256, 1000, 0.5) > peak / 2  # the paper's decays more slowly here


def test_label_smoothed_loss_against_hand_computation():
    logits = torch.tensor([[[2.0, 0.5, -1.0, 0.0], [0.1, 0.2, 0.3, 0.4], [1.0, 1.0, 1.0, 1.0]]])
    target = torch.tensor([[2, 1, PAD]])  # the PAD position must not count
    eps, V = 0.1, 4
    expected = expected_nll = 0.0
    for t, gold in enumerate([2, 1]):
        probs = [math.exp(x) for x in logits[0, t].tolist()]
        logp = [math.log(p / sum(probs)) for p in probs]
        # smoothed target distribution: (1 - eps) on gold + eps / V everywhere
        expected += -sum(((1 - eps) * (k == gold) + eps / V) * logp[k] for k in range(V))
        expected_nll += -logp[gold]
    loss, nll = label_smoothed_loss(logits, target, eps)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert nll.item() == pytest.approx(expected_nll, rel=1e-5)
    unsmoothed, _ = label_smoothed_loss(logits, target, 0.0)
    assert unsmoothed.item() == pytest.approx(expected_nll, rel=1e-5)


@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_label_smoothed_loss_gradient_is_autograds_of_the_formula(eps):
    torch.manual_seed(0)
    logits = (torch.randn(3, 7, 11) * 3).requires_grad_()
    target = torch.randint(4, 11, (3, 7))
    target[0, 5:] = PAD
    target[2, 2:] = PAD
    loss, nll = label_smoothed_loss(logits, target, eps)
    loss.backward()
    reference = logits.detach().clone().requires_grad_()
    lprobs = reference.log_softmax(-1)
    keep = target != PAD
    smoothed = torch.full_like(lprobs, eps / 11).scatter_(-1, target[..., None], 1 - eps + eps / 11)
    expected = -((smoothed * lprobs).sum(-1) * keep).sum()
    expected.backward()
    torch.testing.assert_close(loss, expected.detach())
    torch.testing.assert_close(logits.grad, reference.grad)
    assert logits.grad[~keep].abs().sum() == 0  # padding gets no gradient
    assert not nll.requires_grad


def test_token_batches_respect_the_budget_and_cover_every_sentence():
    rng = np.random.default_rng(0)
    src_lens, tgt_lens = rng.integers(1, 40, 500), rng.integers(1, 40, 500)
    batches = token_batches(src_lens, tgt_lens, 200, np.random.default_rng(1))
    seen = np.concatenate(batches)
    assert sorted(seen.tolist()) == list(range(500))
    for b in batches:
        width = max(int(max(src_lens[b].max(), tgt_lens[b].max())) + 1, 1)
        assert len(b) * width <= 200
    # similar lengths together: padding stays small
    real = sum(int(tgt_lens[b].sum() + len(b)) for b in batches)
    padded = sum(len(b) * int(tgt_lens[b].max() + 1) for b in batches)
    assert real / padded > 0.8


def test_an_overlong_sentence_gets_a_batch_of_its_own():
    batches = token_batches(np.array([3, 500, 4]), np.array([3, 2, 4]), 100)
    assert sorted(len(b) for b in batches) == [1, 2]


def test_collate_shifts_the_target_for_teacher_forcing():
    batch = collate([np.array([7, 8]), np.array([9])], [np.array([5, 6, 4]), np.array([10])])
    assert batch["src"].tolist() == [[7, 8, EOS], [9, EOS, PAD]]
    assert batch["tgt_in"].tolist() == [[BOS, 5, 6, 4], [BOS, 10, PAD, PAD]]
    assert batch["tgt_out"].tolist() == [[5, 6, 4, EOS], [10, EOS, PAD, PAD]]


def test_rdrop_loss_is_the_mean_pass_loss_plus_the_symmetric_kl():
    import torch.nn.functional as F

    from mtkit.engine import rdrop_loss

    torch.manual_seed(0)
    target = torch.tensor([[5, 6, EOS, PAD], [7, EOS, PAD, PAD]])
    p, q = torch.randn(2, 2, 4, 9, dtype=torch.float64)
    logits = torch.cat([p, q]).requires_grad_()
    loss, nll = rdrop_loss(logits, target, 0.1, alpha=5.0)
    one, nll_p = label_smoothed_loss(p, target, 0.1)
    other, nll_q = label_smoothed_loss(q, target, 0.1)
    lp, lq = p.log_softmax(-1), q.log_softmax(-1)
    keep = (target != PAD)[..., None]
    kl_pq = (F.kl_div(lq, lp, log_target=True, reduction="none") * keep).sum()  # KL(p || q)
    kl_qp = (F.kl_div(lp, lq, log_target=True, reduction="none") * keep).sum()
    assert math.isclose(loss.item(), ((one + other) / 2 + 5.0 * (kl_pq + kl_qp) / 4).item(), rel_tol=1e-5)
    assert math.isclose(nll.item(), ((nll_p + nll_q) / 2).item(), rel_tol=1e-5)
    loss.backward()
    assert torch.all(logits.grad[0, 3] == 0) and torch.all(logits.grad[2, 3] == 0)  # PAD: no gradient
    # identical passes: no divergence, the loss of one pass
    same, _ = rdrop_loss(torch.cat([p, p]), target, 0.1, alpha=5.0)
    assert math.isclose(same.item(), one.item(), rel_tol=1e-5)


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_rdrop_step_without_dropout_is_the_plain_step_and_with_dropout_is_not(dropout):
    from dataclasses import replace

    from conftest import tiny_model_config
    from mtkit.config import TrainConfig
    from mtkit.device import Precision
    from mtkit.engine import ComputeContext, train_step
    from mtkit.model import Transformer

    batch = collate([[5, 6, 7], [8, 9]], [[6, 7], [9, 10, 11]])
    n_tokens = int((batch["tgt_out"] != PAD).sum())
    weights = []
    for alpha in (0.0, 5.0):
        torch.manual_seed(0)
        model = Transformer(tiny_model_config(dropout=dropout), 16, 16).train()
        t = replace(TrainConfig(), rdrop_alpha=alpha)
        optimizer = torch.optim.SGD(model.parameters(), lr=1.0, fused=True)  # weights move by the gradient
        torch.manual_seed(1)
        train_step(model, optimizer, [batch], n_tokens, 1, 1.0, t,
                   ComputeContext(torch.device("cpu"), Precision("fp32", "test")))
        weights.append(torch.cat([w.detach().flatten() for w in model.parameters()]))
    same = torch.allclose(weights[0], weights[1], atol=1e-6)
    assert same == (dropout == 0.0)
