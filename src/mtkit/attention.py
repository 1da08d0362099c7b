"""Where each output subword looked: every attention weight of a translation (`attention_maps`:
encoder self-attention, decoder self-attention and encoder-decoder attention, all layers and heads),
their JSON form (`attention_record`, what the server and the viewer read), PNG heatmaps (one map, or
a grid of every head), self-contained HTML pages that inline the viewer (`attention_html`), and hard
alignments in Pharaoh format (`i-j`: source subword i, target subword j, both from 0)."""

from __future__ import annotations

import html
import json
import re
import warnings
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


def _labels(src_pieces: list[str], tgt_pieces: list[str]) -> tuple[list[str], list[str], list[str]]:
    """The axes' subwords: the source and </s>; the output and </s> (what each decoder position
    predicts); <s> and the output (what each decoder position reads)."""
    return [*src_pieces, "</s>"], [*tgt_pieces, "</s>"], ["<s>", *tgt_pieces]


def heads_of(weights: torch.Tensor, head: int | str | None) -> torch.Tensor:
    """(H, R, C) weights of one layer: head `head`'s map, their mean (None), or all of them ("all")."""
    if head == "all":
        return weights
    return weights.mean(0) if head is None else weights[head]


def attention_record(maps: dict[str, torch.Tensor], src_pieces: list[str], tgt_pieces: list[str],
                     digits: int = 4) -> dict:
    """The JSON form of `attention_maps` for one translation (or one piece of a line): the subwords
    that label the axes and, per kind, [layer][head][row][column] weights rounded to `digits`.

    source_tokens: the source subwords and </s> (encoder rows and columns, cross columns);
    target_tokens: the output subwords and </s>, what each decoder position predicts (cross and
    decoder rows); target_inputs: <s> and the output subwords, what each decoder position reads
    (decoder columns)."""
    layers, heads = maps["cross"].shape[:2]
    source, output, inputs = _labels(src_pieces, tgt_pieces)
    record = {"source_tokens": source, "target_tokens": output, "target_inputs": inputs,
              "layers": layers, "heads": heads}
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


AXES = {"cross": ("output", "source"), "encoder": ("source", "source"),
        "decoder": ("output (what it predicts)", "output (what it reads)")}
"""The axis names of each kind's pictures: (rows, columns)."""

_CELL = 0.3
"""Inches per row or column of a small map; a large one shrinks to fit the caps below."""
_MAP_SIDE = 16.0
"""The most inches one map takes on either side."""
_GRID_SIDE = 24.0
"""The most inches a grid of heads shares among its columns (or rows)."""
_GRID_COLUMNS = 4
"""Heads per row of a grid (the Annotated Transformer's figures)."""
_MIN_FONT = 5.0
"""The smallest label font, in points; rows or columns beyond what it fits are labelled every k-th."""


def axis_labels(kind: str, src_pieces: list[str], tgt_pieces: list[str]) -> tuple[list[str], list[str]]:
    """The row and column labels of a map of `kind` (see `attention_maps` for the axes)."""
    source, output, inputs = _labels(src_pieces, tgt_pieces)
    return {"cross": (output, source), "encoder": (source, source), "decoder": (output, inputs)}[kind]


def _ticks(ax, labels: list[str], cell: float, axis: str) -> None:
    """Label every row or column with a font that fits its cell; below a legible size, every k-th."""
    font = cell * 72 * 0.8  # points: four fifths of the cell's height
    step = 1 if font >= _MIN_FONT else -(-_MIN_FONT // font)
    font = min(max(font, _MIN_FONT), 9.0)
    shown = range(0, len(labels), int(step))
    names = [_plain(labels[i]) for i in shown]
    if axis == "x":
        ax.set_xticks(shown, names, rotation=90, fontsize=font, parse_math=False)
    else:
        ax.set_yticks(shown, names, fontsize=font, parse_math=False)


def _plain(text: str) -> str:
    """`text` as a picture shows it: control characters spelled out (\\x08), the rest as is."""
    return "".join(c if c.isprintable() or c == "\n" else c.encode("unicode_escape").decode("ascii")
                   for c in text)


def attention_figure(weights: torch.Tensor, rows: list[str], cols: list[str], title: str = "",
                     axes: tuple[str, str] = AXES["cross"], head_titles: list[str] | None = None):
    """A matplotlib Figure of attention weights: one heatmap of a (rows, cols) map, or, for
    (H, rows, cols), a grid of H heatmaps titled `head_titles` (default head 0 .. H - 1).

    Colours run from 0 to the largest weight drawn (the map's own, or the grid's, shared by its
    heads so that they compare), named on the colour bar: an averaged map is as visible as a sharp
    one. A large map keeps its figure within a cap, with smaller labels (every k-th below 5 pt)."""
    from matplotlib.figure import Figure

    maps = weights[None] if weights.dim() == 2 else weights
    n, n_rows, n_cols = maps.shape
    grid = weights.dim() == 3
    columns = min(n, _GRID_COLUMNS)
    lines = -(-n // columns)
    side = min(_MAP_SIDE, _GRID_SIDE / max(columns, lines)) if grid else _MAP_SIDE
    cell = min(_CELL, side / max(n_rows, n_cols, 1))
    font = min(max(cell * 72 * 0.8, _MIN_FONT), 9.0)
    margin = 0.6 + 0.6 * font / 72 * max(map(len, rows + cols), default=1)  # inches for the tick labels
    width = min(columns * (n_cols * cell + margin) + 1.2, 40.0)
    height = min(lines * (n_rows * cell + margin + 0.3) + 0.8, 40.0)
    fig = Figure(figsize=(max(width, 4.0), max(height, 4.0)), layout="constrained")
    top = float(maps.max()) if maps.numel() else 0.0
    top = top if top > 0 else 1.0
    grid_axes = fig.subplots(lines, columns, squeeze=False).ravel()
    image = None
    for i, ax in enumerate(grid_axes):
        if i >= n:
            ax.remove()  # the unused places of the last row
            continue
        image = ax.imshow(maps[i].numpy(), cmap="viridis", vmin=0.0, vmax=top, aspect="auto",
                          interpolation="nearest")
        _ticks(ax, cols, cell, "x")
        _ticks(ax, rows, cell, "y")
        ax.set_xlabel(axes[1], fontsize=8)
        ax.set_ylabel(axes[0], fontsize=8)
        if grid:
            ax.set_title(head_titles[i] if head_titles else f"head {i}", fontsize=9, parse_math=False)
    scale = f"one scale for all heads, 0 to {top:.3g}" if grid else f"0 to this map's max, {top:.3g}"
    bar = fig.colorbar(image, ax=[ax for ax in grid_axes[:n]], fraction=0.03 if not grid else 0.02)
    bar.set_label(f"weight: {scale}", fontsize=7)
    if title:
        fig.suptitle(_plain(title), fontsize=9, parse_math=False)
    return fig


def save_figure(fig, path: Path) -> None:
    """`fig` as PNG at `path`, written whole (the previous picture stays if writing fails)."""
    with atomic_file(path, "wb") as f, warnings.catch_warnings():
        # a subword in a script the font lacks shows as a box; one warning per picture says nothing more
        warnings.filterwarnings("ignore", "Glyph .* missing from font", UserWarning)
        fig.savefig(f, format="png", dpi=100)


def save_heatmap(weights: torch.Tensor, src_pieces: list[str], tgt_pieces: list[str], path: Path,
                 title: str = "", kind: str = "cross", head_titles: list[str] | None = None) -> None:
    """A PNG heatmap of one map of `kind` (cross: (T + 1, S + 1)), or a grid of one per head for
    (H, ...) weights, with the subwords (and EOS/BOS) on the axes (`attention_figure`)."""
    rows, cols = axis_labels(kind, src_pieces, tgt_pieces)
    save_figure(attention_figure(weights, rows, cols, title, AXES[kind], head_titles), path)


VIEWER_FILES = ("viewer.css", "viewer.js")
"""The offline viewer that an HTML page inlines, in mtkit/static."""
DATA_ID = "mtkit-attention"
"""The id of the page's JSON block: a list of {"line", "text", "records"} the viewer renders."""


def viewer_assets() -> tuple[str, str] | None:
    """The viewer's stylesheet and script (mtkit/static), or None where this installation lacks them."""
    from importlib.resources import files

    static = files("mtkit") / "static"
    try:
        return tuple((static / name).read_text(encoding="utf-8") for name in VIEWER_FILES)
    except (FileNotFoundError, NotADirectoryError):
        return None


def _script_json(data) -> str:
    """JSON that can stand inside a <script> element: no '<', '>' or '&' a parser could end it on
    (escaped as \\u003c etc., which JSON reads back as the same characters)."""
    text = json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def _raw_text(text: str, element: str) -> str:
    """`text` fit to stand inside <style> or <script>: an end tag of `element` within it (in a
    string or comment) gets a backslash, `<\\/script`, which CSS and JS read as the same text."""
    return re.sub(f"</({element})", r"<\\/\1", text, flags=re.IGNORECASE)


def attention_html(entries: list[dict], title: str, assets: tuple[str, str] | None = None) -> str:
    """A self-contained page of attention `entries` ({"line", "text", "records"}): the viewer's
    CSS and JS (`assets`, default mtkit/static's) and the entries as the JSON block it renders,
    nothing loaded from elsewhere. Without the viewer files the page holds the data and says so."""
    assets = assets if assets is not None else viewer_assets()
    head = ['<meta charset="utf-8">', '<meta name="viewport" content="width=device-width, initial-scale=1">',
            f"<title>{html.escape(title)}</title>"]
    body = [f'<script type="application/json" id="{DATA_ID}">{_script_json(entries)}</script>']
    if assets is None:
        body.insert(0, "<p>This mtkit installation has no attention viewer (mtkit/static/viewer.js); "
                       f"the weights are in the JSON block <code>#{DATA_ID}</code> of this page.</p>")
    else:
        css, js = assets
        head.append("<style>\n" + _raw_text(css, "style") + "\n</style>")
        body.append("<script>\n" + _raw_text(js, "script") + "\n</script>")
    return ('<!DOCTYPE html>\n<html lang="en">\n<head>\n' + "\n".join(head) + "\n</head>\n<body>\n"
            + "\n".join(body) + "\n</body>\n</html>\n")
