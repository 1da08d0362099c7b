"""`translate --attention DIR`: the files each kind, layer, head and format writes and their names,
the pictures (one colour scale per map, a grid per head), the JSON and the self-contained HTML page,
pieces of long lines, the joined alignments, and one-line errors that write nothing."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from conftest import untrained_checkpoint
from mtkit.attention import DATA_ID, KINDS, attention_figure, attention_html, hard_alignment, viewer_assets
from mtkit.cli import app
from mtkit.outputs import joined_alignment
from mtkit.translate import Translator

LINES = "the dog runs\n\na small red house\n"
LONG = ", ".join(["the small dog runs in the red house on the street"] * 3)


@pytest.fixture(scope="module")
def model(tmp_path_factory, one_thread) -> Path:
    return untrained_checkpoint(tmp_path_factory.mktemp("pictures"))


@pytest.fixture(scope="module")
def translator(model) -> Translator:
    return Translator.load(model, "cpu")


def translate(model: Path, tmp_path: Path, text: str, *options: str):
    """`mtkit translate` in this process on `text`, translations to tmp_path/out.txt."""
    (tmp_path / "in.txt").write_text(text, encoding="utf-8")
    return CliRunner().invoke(app, ["-q", "translate", "-m", str(model), "-i", str(tmp_path / "in.txt"),
                                    "-o", str(tmp_path / "out.txt"), *options])


def names(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def png_size(path: Path) -> tuple[int, int]:
    """Width and height from a PNG's header (after checking it is one)."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR", path
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


@pytest.mark.parametrize(("options", "expected"), [
    ((), ["000001.png", "000003.png"]),
    (("--attention-kind", "encoder", "--layer", "0", "--head", "all"), ["000001.png", "000003.png"]),
    (("--attention-kind", "all", "--layer", "-1", "--head", "1"),
     [f"00000{n}.{kind}.png" for n in (1, 3) for kind in sorted(KINDS)]),
])
def test_each_line_gets_the_pictures_named_as_documented(model, tmp_path, options, expected):
    result = translate(model, tmp_path, LINES, "--attention", str(tmp_path / "att"), *options)
    assert result.exit_code == 0, result.output
    assert names(tmp_path / "att") == expected  # the empty line 2 gets none
    for name in expected:
        width, height = png_size(tmp_path / "att" / name)
        assert 300 <= width <= 4000 and 300 <= height <= 4000, (name, width, height)
    import matplotlib.image

    picture = matplotlib.image.imread(tmp_path / "att" / expected[0])
    assert picture.ndim == 3 and picture.shape[:2] == png_size(tmp_path / "att" / expected[0])[::-1]


def test_every_head_is_a_subplot_titled_by_its_number():
    weights = torch.rand(5, 4, 6).softmax(-1)
    fig = attention_figure(weights, list("abcd"), list("uvwxyz"), "line 1")
    maps = [ax for ax in fig.axes if ax.images]
    assert len(maps) == 5 and [ax.get_title() for ax in maps] == [f"head {h}" for h in range(5)]
    assert len(fig.axes) == 6  # the five maps and one colour bar; the grid's unused places are gone
    assert {ax.images[0].get_clim() for ax in maps} == {(0.0, float(weights.max()))}  # one scale
    assert "one scale for all heads" in fig.axes[-1].get_ylabel()


def test_a_single_map_is_coloured_up_to_its_own_largest_weight():
    weights = torch.full((3, 4), 0.25)  # an averaged, flat map: on a 0-1 scale all of it would be faint
    fig = attention_figure(weights, ["x", "y", "</s>"], ["a", "b", "c", "</s>"])
    (ax,) = [ax for ax in fig.axes if ax.images]
    assert ax.images[0].get_clim() == (0.0, 0.25)
    assert [t.get_text() for t in ax.get_xticklabels()] == ["a", "b", "c", "</s>"]


def test_a_large_map_stays_within_the_size_cap_with_legible_labels():
    n = 400
    labels = [f"▁word{i}" for i in range(n)]
    fig = attention_figure(torch.rand(n, n), labels, labels)
    width, height = fig.get_size_inches()
    assert width <= 40 and height <= 40
    ax = fig.axes[0]
    ticks = ax.get_xticklabels()
    assert 20 < len(ticks) < n and min(t.get_fontsize() for t in ticks) >= 5  # every k-th, not too small


def test_json_holds_every_kind_layer_and_head_whatever_the_picture_options(model, translator, tmp_path):
    result = translate(model, tmp_path, LINES, "--attention", str(tmp_path / "att"), "--attention-format",
                       "json", "--layer", "0", "--head", "1")
    assert result.exit_code == 0, result.output
    assert names(tmp_path / "att") == ["000001.json", "000003.json"]
    out = (tmp_path / "out.txt").read_text(encoding="utf-8").split("\n")
    entry = json.loads((tmp_path / "att" / "000003.json").read_text(encoding="utf-8"))
    assert entry["line"] == 3 and entry["text"] == out[2]
    expected = translator.attention(translator.run(["a small red house"])[0])
    assert entry["records"] == expected
    (record,) = entry["records"]
    n_layers, n_heads = len(translator.model.decoder), translator.model.cfg.n_heads
    assert (record["layers"], record["heads"]) == (n_layers, n_heads)
    for kind in KINDS:
        weights = torch.tensor(record[kind])
        assert weights.shape[:2] == (n_layers, n_heads), kind
        assert (weights.sum(-1) - 1).abs().max() < 2e-3, kind  # rows are distributions (4 digits kept)


def test_html_page_holds_the_json_block_and_loads_nothing_from_elsewhere(model, translator, tmp_path):
    result = translate(model, tmp_path, LINES, "--attention", str(tmp_path / "att"), "--attention-format",
                       "html")
    assert result.exit_code == 0, result.output
    assert names(tmp_path / "att") == ["000001.html", "000003.html"]
    page = (tmp_path / "att" / "000001.html").read_text(encoding="utf-8")
    block = re.search(f'<script type="application/json" id="{DATA_ID}">(.*?)</script>', page, re.S)
    (entry,) = json.loads(block.group(1))
    assert entry["line"] == 1
    assert entry["records"] == translator.attention(translator.run(["the dog runs"])[0])
    assert not re.search(r"""(?:src|href)\s*=\s*["']?\s*(?:https?:)?//""", page, re.I)


def test_html_page_inlines_the_viewer_and_its_json_survives_any_text():
    entries = [{"line": 1, "text": "</script><script>alert(1)</script> & <!--", "records": []}]
    css, js = "body { color: black; }", 'const end = "</script>"; document.title = "viewer";'
    page = attention_html(entries, "a <title>", (css, js))
    assert page.count("</script>") == 2 and css in page and 'document.title = "viewer"' in page
    block = re.search(f'<script type="application/json" id="{DATA_ID}">(.*?)</script>', page, re.S)
    assert json.loads(block.group(1)) == entries
    assert page.index(f'id="{DATA_ID}"') < page.index("document.title")  # the data is there when it runs


def test_html_page_inlines_the_installed_viewer(tmp_path):
    assets = viewer_assets()
    if assets is None:
        pytest.skip("mtkit/static/viewer.css and viewer.js are not in this installation yet")
    page = attention_html([{"line": 1, "text": "x", "records": []}], "line 1")
    css, js = assets
    assert css.strip()[:200] in page and js.strip()[:200].replace("</script", "<\\/script") in page
    assert not re.search(r"""(?:src|href)\s*=\s*["']?\s*(?:https?:)?//""", page, re.I)


def test_a_line_in_pieces_gets_a_picture_per_piece_and_its_alignments_joined(model, translator, tmp_path):
    result = translator.run([LONG])[0]
    n = len(result.parts)
    assert n >= 2, "the test line should be longer than the model reads at once"
    run = translate(model, tmp_path, f"a cat\n{LONG}\n", "--attention", str(tmp_path / "att"),
                    "--alignment", str(tmp_path / "align.txt"))
    assert run.exit_code == 0, run.output
    assert names(tmp_path / "att") == sorted(["000001.png", *(f"000002-{k}.png" for k in range(1, n + 1))])
    align = (tmp_path / "align.txt").read_text().split("\n")
    pairs = [tuple(map(int, p.split("-"))) for p in align[1].split()]
    assert [t for _, t in pairs] == list(range(len(result.tgt_ids)))  # every output subword, in order
    assert all(0 <= s < len(result.src_ids) for s, _ in pairs)
    pieces = [hard_alignment(translator.cross_attention(src, tgt)) for src, tgt in result.parts]
    first = len(pieces[0])
    assert pairs[:first] == pieces[0]
    shift = len(result.parts[0][0])
    assert pairs[first:first + len(pieces[1])] == [(s + shift, t + first) for s, t in pieces[1]]


def test_joined_alignment_counts_a_prefix_tag_once():
    pairs = [[(0, 0), (2, 1)], [(0, 0), (1, 1)]]  # pieces of 1 tag + 2 and 1 tag + 3 source subwords
    assert joined_alignment(pairs, [(3, 2), (4, 2)], prefix=1) == [(0, 0), (2, 1), (0, 2), (3, 3)]
    assert joined_alignment(pairs, [(3, 2), (4, 2)]) == [(0, 0), (2, 1), (3, 2), (4, 3)]


@pytest.mark.parametrize(("options", "needle"), [
    (("--layer", "2"), "--layer 2: the model has 2 layers"),
    (("--layer", "-3"), "--layer -3"),
    (("--head", "2"), "--head 2: the model has 2 heads"),
    (("--head", "-1"), "--head -1"),
    (("--head", "mean"), "--head 'mean'"),
    (("--attention-format", "svg"), "--attention-format 'svg'"),
    (("--attention-kind", "self"), "--attention-kind 'self'"),
])
def test_a_bad_option_is_one_error_line_and_writes_nothing(model, tmp_path, options, needle):
    result = translate(model, tmp_path, LINES, "--attention", str(tmp_path / "att"),
                       "--alignment", str(tmp_path / "align.txt"), *options)
    errors = [line for line in result.stderr.splitlines() if line.startswith("mtkit: error:")]
    assert result.exit_code == 2 and len(errors) == 1 and needle in errors[0], result.output
    assert names(tmp_path) == ["in.txt"]


def test_attention_options_without_a_directory_are_an_error(model, tmp_path):
    result = translate(model, tmp_path, LINES, "--attention-kind", "all")
    assert result.exit_code == 2 and result.stderr.startswith("mtkit: error: --attention-kind all")
    assert names(tmp_path) == ["in.txt"]
