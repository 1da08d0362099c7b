"""Where each output subword looked: every attention weight of a translation (`attention_maps`:
encoder self-attention, decoder self-attention and encoder-decoder attention, all layers and heads),
their JSON form (`attention_record`, what the server and the viewer read), PNG heatmaps, and hard
alignments in Pharaoh format (`i-j`: source subword i, target subword j, both from 0)."""

from __future__ import annotations

from pathlib import Path

import torch

from mtkit.data.vocab import BOS, EOS, PAD
from mtkit.io import atomic_file

KINDS = ("cross", "encoder", "decoder")
"""The three kinds of attention: encoder-decoder (rows: output subwords, columns: source),
encoder self-attention (source x source), decoder self-attention (output x the decoder's inputs)."""


def _sublayer_input(residual, x: torch.Tensor) -> torch.Tensor:
    """What a residual block's sublayer reads: LayerNorm(x) in pre-norm, x in post-norm (model.Residual)."""
    return residual.norm(x) if residual.pre else x


@torch.no_grad()
def attention_maps(model, src_ids: list[int], tgt_ids: list[int]) -> dict[str, torch.Tensor]:
    """All attention weights of one translation in one teacher-forced pass, float32 on the CPU:
    "encoder" (L, H, S + 1, S + 1), "decoder" (L, H, T + 1, T + 1), "cross" (L, H, T + 1, S + 1),
    S and T the subwords of source and output; the source ends in EOS, the decoder reads BOS first.
    The pass is the model's own layer by layer (model.py), each attention's weights taken where it
    reads its input."""
    device = model.src_embed.tokens.weight.device
    src = torch.tensor([list(src_ids) + [EOS]], device=device)
    tgt_in = torch.tensor([[BOS] + list(tgt_ids)], device=device)
    mask = (src != PAD)[:, None, None, :]
    causal = torch.ones(tgt_in.size(1), tgt_in.size(1), dtype=torch.bool, device=device).tril()
    maps: dict[str, list[torch.Tensor]] = {kind: [] for kind in KINDS}
    x = model.src_embed(src)
    for layer in model.encoder:
        y = _sublayer_input(layer.res1, x)
        maps["encoder"].append(layer.attn.weights(y, layer.attn.project_kv(y), mask)[0])
        x = layer(x, mask)
    cross_kv = model.cross_kv(model.enc_norm(x))
    x = model.tgt_embed(tgt_in)
    for layer, kv in zip(model.decoder, cross_kv):
        own, cross = layer.self_attn, layer.cross_attn
        y = _sublayer_input(layer.res1, x)
        maps["decoder"].append(own.weights(y, own.project_kv(y), causal)[0])
        x = layer.res1(x, lambda z, a=own: a.attend(a.project_q(z), a.project_kv(z), causal=True))
        y = _sublayer_input(layer.res2, x)
        maps["cross"].append(cross.weights(y, kv, mask)[0])
        x = layer.res2(x, lambda z, a=cross, kv=kv: a(z, kv, mask))
        x = layer.res3(x, layer.ffn)
    return {kind: torch.stack(ws).float().cpu() for kind, ws in maps.items()}


def attention_record(maps: dict[str, torch.Tensor], src_pieces: list[str], tgt_pieces: list[str],
                     digits: int = 4) -> dict:
    """The JSON form of `attention_maps` for one translation (or one piece of a line): the subwords
    that label the axes and, per kind, [layer][head][row][column] weights rounded to `digits`.

    source_tokens: the source subwords and </s> (encoder rows and columns, cross columns);
    target_tokens: the output subwords and </s>, what each decoder position predicts (cross and
    decoder rows); target_inputs: <s> and the output subwords, what each decoder position reads
    (decoder columns)."""
    layers, heads = maps["cross"].shape[:2]
    record = {"source_tokens": [*src_pieces, "</s>"], "target_tokens": [*tgt_pieces, "</s>"],
              "target_inputs": ["<s>", *tgt_pieces], "layers": layers, "heads": heads}
    for kind in KINDS:
        record[kind] = maps[kind].round(decimals=digits).tolist()
    return record


def hard_alignment(weights: torch.Tensor) -> list[tuple[int, int]]:
    """(source, target) pairs: each target subword to the source subword it attends to most.

    `weights` is (T + 1, S + 1) with EOS last on both sides; the EOS row and column are left out,
    so the pairs index the subwords alone.
    """
    if weights.size(0) <= 1 or weights.size(1) <= 1:
        return []
    best = weights[:-1, :-1].argmax(-1)  # (T,)
    return [(int(s), t) for t, s in enumerate(best.tolist())]


def pharaoh(pairs: list[tuple[int, int]]) -> str:
    """'0-0 1-2 ...', the format of fast_align and Moses."""
    return " ".join(f"{s}-{t}" for s, t in pairs)


def save_heatmap(weights: torch.Tensor, src_pieces: list[str], tgt_pieces: list[str], path: Path,
                 title: str = "") -> None:
    """A heatmap of (T + 1, S + 1) attention with the subwords (and EOS) on the axes, as PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    src_labels, tgt_labels = [*src_pieces, "</s>"], [*tgt_pieces, "</s>"]
    width, height = 2 + 0.35 * len(src_labels), 1.5 + 0.3 * len(tgt_labels)
    fig, ax = plt.subplots(figsize=(min(width, 40), min(height, 40)))
    try:
        image = ax.imshow(weights.numpy(), cmap="viridis", vmin=0.0, vmax=1.0, aspect="auto")
        ax.set_xticks(range(len(src_labels)), src_labels, rotation=90, fontsize=8)
        ax.set_yticks(range(len(tgt_labels)), tgt_labels, fontsize=8)
        ax.set_xlabel("source")
        ax.set_ylabel("output")
        if title:
            ax.set_title(title, fontsize=9)
        fig.colorbar(image, ax=ax, fraction=0.03)
        fig.tight_layout()
        with atomic_file(path, "wb") as f:  # the picture whole or the previous one, never half of it
            fig.savefig(f, format="png", dpi=100)
    finally:
        plt.close(fig)
