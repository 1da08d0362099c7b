"""The CPU decoding backend computes what the paper's model computes: kernels and layers swapped
in by `install` give the training path's logits, and search finds the same hypotheses with it."""

from __future__ import annotations

import copy

import pytest
import torch

from conftest import tiny_model_config
from mtkit.data.vocab import BOS, EOS, PAD
from mtkit.inference import Backend, KVCache, install
from mtkit.inference.cpu import CPUBackend, FusedSelfAttention, SlotCache, cpu_attention, softmax_
from mtkit.model import MultiHeadAttention, Transformer, sdpa
from mtkit.search import _start, beam_search, greedy_search
from test_model import V, random_src, tiny


def padded_batch() -> torch.Tensor:
    return torch.cat([random_src(1, 7), torch.cat([random_src(2, 4), torch.full((2, 3), PAD)], 1)])


@pytest.mark.parametrize("norm", ["post", "pre"])
def test_installed_model_gives_the_training_paths_logits(norm):
    """Fused q/k/v, packed linear layers with the ReLU folded in, the CPU attention kernel, caches
    with a free slot and transposed encoder keys: the logits of the model as trained."""
    model = tiny(norm=norm, n_layers=2)
    src = padded_batch()
    tgt = torch.cat([torch.full((3, 1), BOS), torch.randint(4, V, (3, 9))], 1)
    trained = model.train()(src, tgt)  # dropout is 0: training's path, through SDPA
    installed = copy.deepcopy(model)
    backend = install(installed, torch.device("cpu"))
    assert isinstance(backend, CPUBackend)
    assert isinstance(installed.decoder[0].self_attn, FusedSelfAttention)
    torch.testing.assert_close(installed(src, tgt), trained, atol=1e-5, rtol=1e-5)
    cross, mask, cache = _start(installed, src, backend)
    steps = [installed.decode(tgt[:, t : t + 1], cross, mask, cache, start=t) for t in range(tgt.size(1))]
    torch.testing.assert_close(torch.cat(steps, 1), trained, atol=1e-5, rtol=1e-5)


def test_attention_calls_the_kernel_it_is_given_and_eval_changes_nothing_else():
    calls = []

    def recording(q, k, v, mask=None, causal=False, dropout_p=0.0):
        calls.append((q.shape, causal, dropout_p))
        return sdpa(q, k, v, mask, causal, dropout_p)

    cfg = tiny_model_config(d_model=8, n_heads=2, attention_dropout=0.25)
    attn = MultiHeadAttention(cfg, kernel=recording)
    x = torch.randn(2, 3, 8)
    q, k, v = attn.project_qkv(x)
    attn.train().attend(q, (k, v), causal=True)
    attn.eval().attend(q, (k, v), causal=True)
    assert calls == [((2, 2, 3, 4), True, 0.25), ((2, 2, 3, 4), True, 0.0)]
    model = tiny()
    model.eval()
    assert {m.kernel for m in model.modules() if isinstance(m, MultiHeadAttention)} == {sdpa}


@pytest.mark.parametrize("lq, lk, d_k", [(1, 3, 4), (2, 9, 16), (4, 40, 16), (60, 60, 8)])
def test_cpu_attention_equals_sdpa_at_every_size(lq, lk, d_k):
    """Elementwise products (fewer than SMALL_BMM multiply-adds), batched matmuls, and SDPA above
    MATH_ATTENTION_MAX: the same values; a query with no key gets zeros, as in SDPA."""
    q, k, v = torch.randn(3, 2, lq, d_k), torch.randn(3, 2, lk, d_k), torch.randn(3, 2, lk, d_k)
    mask = torch.ones(3, 1, 1, lk, dtype=torch.bool)
    mask[1, ..., lk // 2 :] = False
    mask[2] = False  # nothing to attend to
    expected = sdpa(q, k, v, mask)
    assert torch.equal(expected[2], torch.zeros_like(expected[2]))
    torch.testing.assert_close(cpu_attention(q, k, v, mask), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cpu_attention(q, k, v), sdpa(q, k, v), atol=1e-5, rtol=1e-5)


def test_fused_self_attention_answers_every_method_as_the_original():
    cfg = tiny_model_config(d_model=8, n_heads=2)
    attn = MultiHeadAttention(cfg).eval()
    fused = FusedSelfAttention(copy.deepcopy(attn))
    x, mem = torch.randn(2, 3, 8), torch.randn(2, 5, 8)
    for a, b in zip(attn.project_qkv(x), fused.project_qkv(x)):
        torch.testing.assert_close(a, b)
    kv = attn.project_kv(mem)
    torch.testing.assert_close(fused.project_kv(mem)[1], kv[1])
    torch.testing.assert_close(fused(x, kv), attn(x, kv))
    torch.testing.assert_close(fused.weights(x, kv), attn.weights(x, kv))


@pytest.mark.parametrize("length", [1, 2, 7, 15, 16, 17, 40])
def test_softmax_equals_torch_softmax_at_every_length(length):
    scores = torch.randn(6, 3, 2, length) * 50  # exp overflows float32 without the max subtracted
    scores[0, 0, 0, 1:] = float("-inf")  # masked keys
    torch.testing.assert_close(softmax_(scores.clone()), scores.softmax(-1))
    leaf = scores.clone().requires_grad_()  # differentiable where autograd asks
    (softmax_(leaf * 1.0) * torch.arange(length)).sum().backward()
    (reference := scores.clone().requires_grad_()).softmax(-1).mul(torch.arange(length)).sum().backward()
    torch.testing.assert_close(leaf.grad, reference.grad)


@pytest.mark.parametrize("vocab, width", [(640, 1), (640, 4), (37, 4)])
def test_block_search_equals_topk_of_the_sum(vocab, width):
    """The CPU backend's block search (640: 20 blocks of 32 tokens; 37 has no split: plain topk)
    finds the same values at the same indices as topk of log-probabilities + hypothesis scores."""
    torch.manual_seed(0)
    n, k = 5, 2 * width + 2
    logp = torch.randn(n * width, vocab).log_softmax(-1)
    scores = -torch.rand(n, width) * 3
    if vocab == 640:  # sentence 0's best candidates crowd one block (tokens 5, 25, 45, ...) of one hypothesis
        logp[width - 1, 5 + torch.arange(k) * 20] = torch.linspace(3.0, 2.0, k)
    logp[width : 2 * width, :] = float("-inf")  # sentence 1: only EOS left (at the length limit)
    logp[width : 2 * width, EOS] = -2.0
    values, index = CPUBackend().best_candidates(logp.clone(), scores, k)
    expected = Backend().best_candidates(logp.clone(), scores, k)
    torch.testing.assert_close(values, expected.values)
    finite = expected.values.isfinite()  # among -inf candidates any index is right
    assert torch.equal(index[finite], expected.indices[finite])
    if vocab == 640:  # sentence 0's best k are the crowded block's
        assert set(index[0].tolist()) == {(width - 1) * vocab + 5 + 20 * i for i in range(k)}


@pytest.mark.parametrize("quantize", [None, "int8"])
def test_search_finds_the_same_with_the_cpu_backend(quantize):
    model = Transformer(tiny_model_config(n_layers=2), 640, 640).eval()
    src = torch.cat([random_src(2, 6), torch.cat([random_src(3, 4), torch.full((3, 2), PAD)], 1)])
    plain = beam_search(model, src, beam_size=4, nbest=4)
    installed = copy.deepcopy(model)
    backend = install(installed, torch.device("cpu"), quantize)
    fast = beam_search(installed, src, beam_size=4, nbest=4, backend=backend)
    if quantize is None:
        assert [[h.tokens for h in hyps] for hyps in fast] == [[h.tokens for h in hyps] for hyps in plain]
        for a, b in zip(fast, plain):
            assert [h.score for h in a] == pytest.approx([h.score for h in b], abs=1e-5)
        assert greedy_search(installed, src, backend=backend) == greedy_search(model, src)
    else:  # int8 changes the numbers, not the shape of the result
        assert [len(h) for h in fast] == [len(h) for h in plain]
        assert all(h.score <= 0 for hyps in fast for h in hyps)


def test_slot_cache_keeps_the_rows_beam_search_picks():
    slot, plain = SlotCache(), KVCache()
    torch.manual_seed(0)
    rows = 3
    for t in range(12):
        k = torch.randn(rows, 2, 1, 4)
        got, want = slot.append(k, -k), plain.append(k, -k)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
        index = torch.randint(0, rows, (6 if t == 0 else int(torch.randint(1, 7, ())),))  # grow, shrink
        slot.reorder(index)
        plain.reorder(index)
        rows = index.numel()
