"""attention_maps: every attention weight of a translation, layer by layer as the model computes it."""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_model_config
from mtkit import inference
from mtkit.attention import KINDS, attention_maps, attention_record
from mtkit.model import Transformer


def hooked_cross(model: Transformer, src_ids: list[int], tgt_ids: list[int]) -> torch.Tensor:
    """Encoder-decoder weights (L, H, T + 1, S + 1) caught from the model's own forward pass."""
    from mtkit.data.vocab import BOS, EOS

    seen = []
    hooks = [layer.cross_attn.register_forward_hook(lambda m, args, out: seen.append(m.weights(*args)[0]))
             for layer in model.decoder]
    try:
        with torch.no_grad():
            model(torch.tensor([src_ids + [EOS]]), torch.tensor([[BOS] + tgt_ids]))
    finally:
        for hook in hooks:
            hook.remove()
    return torch.stack(seen)


@pytest.mark.parametrize("norm", ["post", "pre"])
@pytest.mark.parametrize("installed", [False, True])
def test_maps_are_the_forward_pass_weights(norm, installed):
    model = Transformer(tiny_model_config(n_layers=2, norm=norm), 30, 30).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.2 * torch.randn_like(p))
    src, tgt = [5, 9, 11, 7, 4], [6, 8, 10]
    expected = hooked_cross(model, src, tgt)
    if installed:
        inference.install(model, torch.device("cpu"))  # fused self-attention, packed layers
    maps = attention_maps(model, src, tgt)
    assert maps["encoder"].shape == (2, 2, 6, 6) and maps["decoder"].shape == (2, 2, 4, 4)
    assert maps["cross"].shape == (2, 2, 4, 6)
    torch.testing.assert_close(maps["cross"], expected, atol=1e-5, rtol=0)
    for kind in KINDS:  # each row a distribution
        torch.testing.assert_close(maps[kind].sum(-1), torch.ones(maps[kind].shape[:-1]), atol=1e-5, rtol=0)
    assert maps["decoder"].triu(1).abs().max() == 0  # no position sees a later one
    record = attention_record(maps, ["a", "b", "c", "d", "e"], ["x", "y", "z"])
    assert record["source_tokens"][-1] == "</s>" and record["target_inputs"][0] == "<s>"
    assert (record["layers"], record["heads"]) == (2, 2)
    assert len(record["cross"][1][0]) == 4 and len(record["cross"][1][0][0]) == 6
