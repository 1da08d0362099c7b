"""Decoding backends: how search runs a trained model on one kind of device.

`model.py` is the paper and stays so; a backend is installed explicitly, by `install`, on a model
that will only decode. The default backend runs the model as it is (any device, SDPA attention);
`mtkit.inference.cpu` rewrites it for CPU decoding with the same outputs in fp32.
"""

from __future__ import annotations

import torch

from mtkit.model import Transformer


class KVCache:
    """One decoder layer's self-attention keys and values so far (B, H, t, d_k), for decoding one
    position at a time; beam search keeps the rows of the hypotheses that survive a step."""

    def __init__(self) -> None:
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Add one position (B, H, 1, d_k); returns the keys and values so far."""
        if self.k is None:
            self.k, self.v = k, v
        else:
            self.k, self.v = torch.cat([self.k, k], 2), torch.cat([self.v, v], 2)
        return self.k, self.v

    def reorder(self, index: torch.Tensor) -> None:
        """Keep rows `index` (each surviving hypothesis's parent), in that order."""
        self.k, self.v = self.k.index_select(0, index), self.v.index_select(0, index)


class Backend:
    """Decoding state the search asks a backend for: the layer caches, the layout of the encoder's
    keys and values, and the best candidates of a step. This one: the model as trained."""

    name = "default"

    def new_cache(self, model: Transformer) -> list[KVCache]:
        """Empty self-attention caches, one per decoder layer."""
        return [KVCache() for _ in model.decoder]

    def memory_kv(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The encoder keys and values (B, H, S, d_k) as every decoding step will read them."""
        return k.contiguous(), v.contiguous()

    def keep_rows(self, k: torch.Tensor, v: torch.Tensor,
                  keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows `keep` of `memory_kv`'s keys and values, laid out as it lays them out."""
        return k.index_select(0, keep), v.index_select(0, keep)

    def best_candidates(self, logp: torch.Tensor, scores: torch.Tensor,
                        k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The k best of logp (n * width, V) + scores (n, width) among each of the n sentences'
        width x V candidates: (values, indices into width * V), best first (logp may be overwritten)."""
        n = scores.size(0)
        return logp.add_(scores.view(-1, 1)).view(n, -1).topk(k, dim=1)


def install(model: Transformer, device: torch.device, quantize: str | None = None) -> Backend:
    """Prepare `model` (in place, switched to eval) for decoding on `device`: the CPU backend there,
    else the default. `quantize` "int8" (CPU only) quantises the linear layers dynamically."""
    model.eval()
    if device.type == "cpu":
        from mtkit.inference.cpu import install as install_cpu

        return install_cpu(model, quantize)
    if quantize is not None:
        raise ValueError(f"quantize={quantize!r} is for CPU decoding")
    return Backend()
