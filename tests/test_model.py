"""The Transformer against the paper: positions, attention, masks, parameter counts, decoding."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_model_config
from mtkit.config import ModelConfig
from mtkit.data.vocab import BOS, EOS, PAD
from mtkit.inference import KVCache
from mtkit.model import MultiHeadAttention, Transformer, count_parameters, sinusoids
from mtkit.search import beam_search, greedy_search, length_penalty

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


@pytest.mark.parametrize("size, d_model, d_ff, heads, paper", [
    ("base", 512, 2048, 8, 65e6), ("big", 1024, 4096, 16, 213e6)])
def test_parameter_count_is_the_architecture_of_table_3(size, d_model, d_ff, heads, paper):
    """Counted layer by layer with the shipped 37,000-token shared vocabulary: base has 63.1M
    (the paper's Table 3 says 65M, big 213M; README lists the difference among the departures)."""
    cfg = ModelConfig(d_model=d_model, d_ff=d_ff, n_heads=heads, n_layers=6)
    with torch.device("meta"):
        model = Transformer(cfg, 37000, 37000)
    D, V = d_model, 37000
    attention, ffn, norm = 4 * (D * D + D), 2 * D * d_ff + d_ff + D, 2 * D
    encoder, decoder = attention + ffn + 2 * norm, 2 * attention + ffn + 3 * norm
    assert count_parameters(model) == V * D + 6 * (encoder + decoder)  # one shared embedding matrix
    assert abs(count_parameters(model) - paper) / paper < 0.03


@pytest.mark.parametrize("norm", ["post", "pre"])
def test_incremental_decoding_gives_the_full_logits(norm):
    model = tiny(norm=norm)
    src = torch.cat([random_src(1, 6), torch.cat([random_src(1, 4), torch.full((1, 2), PAD)], 1)])
    tgt = torch.cat([torch.full((2, 1), BOS), torch.randint(4, V, (2, 20))], 1)
    full = model(src, tgt)
    memory, mask = model.encode(src)
    cross, cache = model.cross_kv(memory), [KVCache() for _ in model.decoder]
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


@pytest.mark.parametrize("alpha", [0.0, 0.6, 1.5])
def test_a_hypothesis_score_is_its_teacher_forced_log_probability_over_the_length_penalty(alpha):
    torch.manual_seed(1)
    model = tiny(n_layers=2)
    with torch.no_grad():  # a less eager EOS: outputs of several lengths
        model.tgt_embed.tokens.weight[EOS] *= 0.6
    src = torch.cat([random_src(2, 7), torch.cat([random_src(2, 4), torch.full((2, 3), PAD)], 1)])
    for i, hyps in enumerate(beam_search(model, src, beam_size=3, alpha=alpha, max_len_offset=8, nbest=3)):
        for h in hyps:
            tgt = torch.tensor([[BOS] + h.tokens])
            logp = F.log_softmax(model(src[i : i + 1], tgt), -1)[0]
            total = sum(logp[t, tok].item() for t, tok in enumerate(h.tokens + [EOS]))
            assert h.score == pytest.approx(total / length_penalty(len(h.tokens) + 1, alpha), abs=1e-4)


@pytest.mark.parametrize("alpha", [0.0, 0.6, 2.0])
def test_the_bound_rule_finds_at_least_what_k_finished_finds(alpha):
    """The beams evolve alike under both rules; "bound" ends a sentence only when no live
    hypothesis can beat its best, so its best is never worse than fairseq's first K."""
    torch.manual_seed(2)
    model = tiny(n_layers=2)
    with torch.no_grad():
        model.tgt_embed.tokens.weight[EOS] *= 2.0  # outputs of 0 to 16 subwords
    src = torch.cat([random_src(4, 7), torch.cat([random_src(4, 4), torch.full((4, 3), PAD)], 1)])
    fairseq = beam_search(model, src, beam_size=3, alpha=alpha, max_len_offset=10)
    bound = beam_search(model, src, beam_size=3, alpha=alpha, max_len_offset=10, stopping="bound")
    exhaustive = beam_search(model, src, beam_size=3, alpha=alpha, max_len_offset=10, stopping="bound",
                             nbest=3)  # needs 3 hypotheses beating every live one: searches at least as long
    for a, b, c in zip(fairseq, bound, exhaustive):
        assert b[0].score >= a[0].score - 1e-4  # batches of other sizes: float noise
        assert c[0].tokens == b[0].tokens and c[0].score == pytest.approx(b[0].score, abs=1e-4)
    if alpha == 2.0:  # a strong length reward: longer hypotheses ending after the first K win
        assert any(b[0].score > a[0].score + 1e-3 for a, b in zip(fairseq, bound))


def test_a_group_of_queries_attends_as_if_the_keys_were_repeated():
    """Beam search's K hypotheses per sentence share one copy of its encoder keys (group=K)."""
    cfg = tiny_model_config(d_model=8, n_heads=2)
    attn = MultiHeadAttention(cfg).eval()
    x, mem = torch.randn(6, 1, 8), torch.randn(2, 5, 8)  # 2 sentences x 3 hypotheses
    mask = torch.tensor([[True] * 5, [True] * 3 + [False] * 2])[:, None, None, :]
    kv = attn.project_kv(mem)
    repeated = tuple(t.repeat_interleave(3, 0) for t in kv)
    torch.testing.assert_close(attn(x, kv, mask, group=3), attn(x, repeated, mask.repeat_interleave(3, 0)))
    torch.testing.assert_close(attn.weights(x, kv, mask, group=3),
                               attn.weights(x, repeated, mask.repeat_interleave(3, 0)))


def test_activation_dropout_drops_hidden_units_in_training_only():
    from mtkit.model import FeedForward

    torch.manual_seed(0)
    ffn = FeedForward(tiny_model_config(d_model=8, d_ff=64, activation_dropout=0.5))
    x = torch.randn(4, 5, 8)
    exact = ffn.w2(torch.relu(ffn.w1(x)))
    assert torch.equal(ffn.eval()(x), exact)
    ffn.train()
    torch.manual_seed(1)
    first = ffn(x)
    torch.manual_seed(1)
    assert torch.equal(ffn(x), first)  # the dropout draws come from torch's generator
    assert not torch.allclose(ffn(x), first)  # and differ from draw to draw
    # what is dropped is hidden units: with W2 = 0 but its bias, nothing of the dropout shows
    with torch.no_grad():
        ffn.w2.weight.zero_()
    assert torch.equal(ffn(x), ffn.w2.bias.expand(4, 5, 8))
    plain = FeedForward(tiny_model_config(d_model=8, d_ff=64)).train()
    assert torch.equal(plain(x), plain.w2(torch.relu(plain.w1(x))))  # 0: the paper's FFN, untouched
