"""The learning-curve picture `mtkit train` keeps beside its checkpoints, drawn from log.jsonl."""

from __future__ import annotations

import json
from pathlib import Path

from mtkit.io import atomic_file


def plot_curves(log_path: Path, out: Path) -> None:
    """Learning curves (train/valid loss, valid BLEU, learning rate) from the JSONL log, as PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
    train = [r for r in records if "loss" in r]
    valid = [r for r in records if "valid_loss" in r]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    try:
        axes[0].plot([r["step"] for r in train], [r["nll"] for r in train], label="train nll")
        axes[0].plot([r["step"] for r in valid], [r["valid_loss"] for r in valid], "o-", label="valid nll")
        axes[0].set(xlabel="step", ylabel="loss per token", title="loss")
        axes[0].legend()
        axes[1].plot([r["step"] for r in valid], [r["valid_bleu"] for r in valid], "o-")
        axes[1].set(xlabel="step", ylabel="sacreBLEU", title="validation BLEU")
        axes[2].plot([r["step"] for r in train], [r["lr"] for r in train])
        axes[2].set(xlabel="step", ylabel="lr", title="learning rate")
        fig.tight_layout()
        with atomic_file(out, "wb") as f:  # the picture whole or the previous one, never half of it
            fig.savefig(f, format="png", dpi=80)
    finally:
        plt.close(fig)
