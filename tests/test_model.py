"""The Transformer against the paper: positions, attention, masks, parameter counts, decoding."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_model_config
from mtkit.config import ModelConfig
from mtkit.model import BOS, EOS, PAD, KVCache, MultiHeadAttention, Transformer, count_parameters, sinusoids, softmax_
from mtkit import model as model_module
from mtkit import search as search_module
from mtkit.search import _start as search_start
from mtkit.search import beam_search, best_candidates, greedy_search
from mtkit.translate import for_cpu_inference

V = 32


def tiny(**changes) -> Transformer:
    return Transformer(tiny_model_config(**changes), V, V).eval()


def random_src(batch: int, length: int) -> torch.Tensor:
    src = torch.randint(4, V, (batch, length))
    src[:, -1] = EOS
    return src


def test_sinusoids_follow_section_3_5():
    pe = sinusoids(50, 8)
    for pos in (0, 1, 17, 49):
        for i in range(4):
            angle = pos / 10000 ** (2 * i / 8)
            assert pe[pos, 2 * i].item() == pytest.approx(math.sin(angle), abs=1e-6)
            assert pe[pos, 2 * i + 1].item() == pytest.approx(math.cos(angle), abs=1e-6)


def test_attention_equals_reference_computation():
    cfg = tiny_model_config(d_model=8, n_heads=2)
    attn = MultiHeadAttention(cfg).eval()
    x, mem = torch.randn(2, 3, 8), torch.randn(2, 5, 8)
    mask = torch.tensor([[True] * 5, [True] * 3 + [False] * 2])[:, None, None, :]
    got = attn(x, attn.project_kv(mem), mask)
    q = attn.q(x).view(2, 3, 2, 4).transpose(1, 2)
    k = attn.k(mem).view(2, 5, 2, 4).transpose(1, 2)
    v = attn.v(mem).view(2, 5, 2, 4).transpose(1, 2)
    scores = q @ k.transpose(-1, -2) / math.sqrt(4)  # Equation 1
    weights = scores.masked_fill(~mask, float("-inf")).softmax(-1)
    expected = attn.out((weights @ v).transpose(1, 2).reshape(2, 3, 8))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("norm", ["post", "pre"])
def test_source_padding_never_changes_the_output(norm):
    model = tiny(norm=norm)
    src = random_src(1, 6)
    tgt = torch.tensor([[BOS, 5, 6, 7]])
    alone = model(src, tgt)
    padded = torch.cat([src, torch.full((1, 4), PAD)], 1)
    other = random_src(1, 10)
    batch = model(torch.cat([padded, other]), torch.cat([tgt, tgt]))
    torch.testing.assert_close(batch[:1], alone, atol=1e-5, rtol=1e-5)


def test_decoder_is_causal():
    model = tiny()
    src = random_src(2, 7)
    tgt = torch.randint(4, V, (2, 6))
    before = model(src, tgt)
    changed = tgt.clone()
    changed[:, 4:] = torch.randint(4, V, (2, 2))
    after = model(src, changed)
    torch.testing.assert_close(after[:, :4], before[:, :4])
    assert not torch.allclose(after[:, 4:], before[:, 4:])


def test_embeddings_are_shared_with_the_output_projection():
    model = tiny()
    assert model.src_embed.tokens.weight is model.tgt_embed.tokens.weight
    src, tgt = random_src(1, 5), torch.tensor([[BOS, 9]])
    logits = model(src, tgt)
    with torch.no_grad():
        model.tgt_embed.tokens.weight[11] += torch.randn(16)  # not constant: LayerNorm output sums to 0
    assert not torch.allclose(model(src, tgt)[..., 11], logits[..., 11])


@pytest.mark.parametrize("size, d_model, d_ff, heads, expected", [
    ("base", 512, 2048, 8, 65e6), ("big", 1024, 4096, 16, 213e6)])
def test_parameter_count_matches_table_3(size, d_model, d_ff, heads, expected):
    cfg = ModelConfig(d_model=d_model, d_ff=d_ff, n_heads=heads, n_layers=6)
    with torch.device("meta"):
        model = Transformer(cfg, 37000, 37000)
    assert abs(count_parameters(model) - expected) / expected < 0.03


@pytest.mark.parametrize("norm", ["post", "pre"])
def test_incremental_decoding_gives_the_full_logits(norm):
    model = tiny(norm=norm)
    src = torch.cat([random_src(1, 6), torch.cat([random_src(1, 4), torch.full((1, 2), PAD)], 1)])
    tgt = torch.cat([torch.full((2, 1), BOS), torch.randint(4, V, (2, 20))], 1)
    full = model(src, tgt)
    memory, mask = model.encode(src)
    cross, cache = model.cross_kv(memory), model.new_cache()
    steps = [model.decode(tgt[:, t : t + 1], cross, mask, cache, start=t) for t in range(tgt.size(1))]
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)


def test_beam_size_one_equals_greedy():
    model = tiny(n_layers=2)
    src = torch.cat([random_src(3, 8), torch.cat([random_src(2, 5), torch.full((2, 3), PAD)], 1)])
    greedy = greedy_search(model, src, max_len_offset=10)
    beam = beam_search(model, src, beam_size=1, alpha=0.6, max_len_offset=10)
    assert [h[0].tokens for h in beam] == greedy


def test_beam_search_finds_at_least_the_greedy_score():
    model = tiny(n_layers=2)
    src = random_src(4, 6)
    greedy = greedy_search(model, src, max_len_offset=8)
    beams = beam_search(model, src, beam_size=4, alpha=0.0, max_len_offset=8, nbest=4)
    memory, mask = model.encode(src)
    for i, tokens in enumerate(greedy):
        tgt = torch.tensor([[BOS] + tokens])
        logp = F.log_softmax(model(src[i : i + 1], tgt), -1)[0]
        greedy_score = sum(logp[t, tok].item() for t, tok in enumerate(tokens + [EOS]))
        assert beams[i][0].score >= greedy_score - 1e-4
        assert 1 <= len(beams[i]) <= 4
        assert [h.score for h in beams[i]] == sorted((h.score for h in beams[i]), reverse=True)


def test_early_exit_keeps_the_best_hypothesis_without_length_penalty():
    """Once a step's best candidate is EOS, no continuation can beat it on raw log-probability."""
    torch.manual_seed(0)
    model = tiny(n_layers=2)
    with torch.no_grad():  # a less eager EOS: outputs of 0 to 18 subwords rather than all empty
        model.tgt_embed.tokens.weight[EOS] *= 0.6
    src = torch.cat([random_src(3, 7), torch.cat([random_src(3, 4), torch.full((3, 3), PAD)], 1)])
    full = beam_search(model, src, beam_size=4, alpha=0.0, max_len_offset=12, nbest=2)
    assert len({len(h[0].tokens) for h in full}) > 1
    early = beam_search(model, src, beam_size=4, alpha=0.0, max_len_offset=12, nbest=2, early_exit=True)
    for a, b in zip(full, early):
        assert b[0].tokens == a[0].tokens and b[0].score == pytest.approx(a[0].score, abs=1e-5)
        assert 1 <= len(b) <= 2 and b[0].score >= b[-1].score


def test_output_length_is_limited_by_source_plus_offset():
    model = tiny()
    src = random_src(2, 5)
    for tokens in greedy_search(model, src, max_len_offset=3):
        assert len(tokens) <= 4 + 3  # 4 source tokens + EOS
    for hyps in beam_search(model, src, beam_size=3, max_len_offset=3):
        assert all(len(h.tokens) <= 4 + 3 for h in hyps)


@pytest.mark.parametrize("norm", ["post", "pre"])
@pytest.mark.parametrize("small_kernels", [True, False])
def test_cpu_decoding_path_gives_the_training_path_logits(norm, small_kernels, monkeypatch):
    """Inference on CPU attends with two matmuls instead of SDPA (elementwise where bmm's and
    softmax's small-size kernels are slow: at this size every decoding step, or never), search
    lays out the encoder keys transposed, and `for_cpu_inference` fuses q/k/v into one layer and
    packs every linear layer (ReLU folded in): same logits as training's path."""
    if not small_kernels:
        monkeypatch.setattr(model_module, "SMALL_BMM", 0)
        monkeypatch.setattr(model_module, "SMALL_SOFTMAX", 0)
    model = tiny(norm=norm, n_layers=2)
    src = torch.cat([random_src(1, 7), torch.cat([random_src(2, 4), torch.full((2, 3), PAD)], 1)])
    tgt = torch.cat([torch.full((3, 1), BOS), torch.randint(4, V, (3, 9))], 1)
    sdpa = model.train()(src, tgt)  # dropout is 0: the training path, through SDPA
    torch.testing.assert_close(model.eval()(src, tgt), sdpa, atol=1e-5, rtol=1e-5)
    packed = for_cpu_inference(copy.deepcopy(model), None)
    assert packed.decoder[0].self_attn.qkv is not None and packed.decoder[0].self_attn.q is None
    cross, mask, cache = search_start(packed, src)
    steps = [packed.decode(tgt[:, t : t + 1], cross, mask, cache, start=t) for t in range(tgt.size(1))]
    torch.testing.assert_close(torch.cat(steps, 1), sdpa, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("length", [1, 2, 7, 15, 16, 17, 40])
def test_softmax_equals_torch_softmax_at_every_length(length):
    scores = torch.randn(6, 3, 2, length) * 50  # exp overflows float32 without the max subtracted
    scores[0, 0, 0, 1:] = float("-inf")  # masked keys
    torch.testing.assert_close(softmax_(scores.clone()), scores.softmax(-1))
    leaf = scores.clone().requires_grad_()  # eval-mode attention stays differentiable
    (softmax_(leaf * 1.0) * torch.arange(length)).sum().backward()
    (reference := scores.clone().requires_grad_()).softmax(-1).mul(torch.arange(length)).sum().backward()
    torch.testing.assert_close(leaf.grad, reference.grad)


@pytest.mark.parametrize("vocab, width", [(640, 1), (640, 4), (37, 4)])
def test_best_candidates_equal_topk_of_the_sum(vocab, width):
    """Beam search's block search (640: 20 blocks of 32 tokens; 37 has no split: plain topk) finds
    the same values at the same indices as topk of log-probabilities + hypothesis scores."""
    torch.manual_seed(0)
    n, k = 5, 2 * width + 2
    logp = torch.randn(n * width, vocab).log_softmax(-1)
    scores = -torch.rand(n, width) * 3
    if vocab == 640:  # sentence 0's best candidates crowd one block (tokens 5, 25, 45, ...) of one hypothesis
        logp[width - 1, 5 + torch.arange(k) * 20] = torch.linspace(3.0, 2.0, k)
    logp[width : 2 * width, :] = float("-inf")  # sentence 1: only EOS left (at the length limit)
    logp[width : 2 * width, EOS] = -2.0
    values, index = best_candidates(logp.clone(), scores, k)
    expected = (logp + scores.view(-1, 1)).view(n, width * vocab).topk(k, dim=1)
    torch.testing.assert_close(values, expected.values)
    finite = expected.values.isfinite()  # among -inf candidates any index is right
    assert torch.equal(index[finite], expected.indices[finite])
    if vocab == 640:  # sentence 0's best k are the crowded block's
        assert set(index[0].tolist()) == {(width - 1) * vocab + 5 + 20 * i for i in range(k)}


def test_beam_search_finds_the_same_with_and_without_the_block_search(monkeypatch):
    model = Transformer(tiny_model_config(n_layers=2), 640, 640).eval()
    src = torch.cat([random_src(2, 6), torch.cat([random_src(3, 4), torch.full((3, 2), PAD)], 1)])
    blocked = beam_search(model, src, beam_size=4, nbest=4)
    monkeypatch.setattr(search_module, "_blocks", lambda vocab: None)  # plain topk
    plain = beam_search(model, src, beam_size=4, nbest=4)
    assert [[h.tokens for h in hyps] for hyps in blocked] == [[h.tokens for h in hyps] for hyps in plain]
    assert [[h.score for h in hyps] for hyps in blocked] == [[h.score for h in hyps] for hyps in plain]


def test_kv_cache_keeps_the_rows_beam_search_picks():
    cache, ref_k = KVCache(), None
    torch.manual_seed(0)
    rows = 3
    for t in range(12):
        k = torch.randn(rows, 2, 1, 4)
        ref_k = k if ref_k is None else torch.cat([ref_k, k], 2)
        got_k, got_v = cache.append(k, -k)
        assert torch.equal(got_k, ref_k) and torch.equal(got_v, -ref_k)
        index = torch.randint(0, rows, (6 if t == 0 else int(torch.randint(1, 7, ())),))  # grow, shrink
        cache.reorder(index)
        ref_k, rows = ref_k.index_select(0, index), index.numel()
