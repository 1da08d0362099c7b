"""Where each output subword looked: encoder-decoder attention as PNG heatmaps and as hard
alignments in Pharaoh format (`i-j`: source subword i, target subword j, both from 0)."""

from __future__ import annotations

from pathlib import Path

import torch

from mtkit.io import atomic_file


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
