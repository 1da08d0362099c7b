"""mtkit.io, the one place for safe file work: a failed write leaves the old file or directory as
it was and no temporary behind; every writer in the package goes through it."""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import pytest
import torch

from mtkit.errors import UserError
from mtkit.io import atomic_dir, atomic_file, open_bytes, open_text, write_bytes, write_text


class Boom(Exception):
    """An error raised in the middle of a write."""


def leftovers(directory: Path) -> list[Path]:
    """Temporary files or directories a write left in `directory`."""
    return sorted(p for p in directory.iterdir() if p.name.startswith("."))


def listing(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


# atomic_file

def test_atomic_file_text_keeps_the_old_content_and_no_temporary_on_an_exception(tmp_path):
    path = tmp_path / "out.txt"
    path.write_text("old\n")
    with pytest.raises(Boom):
        with atomic_file(path) as f:
            f.write("new, half")
            f.flush()
            raise Boom
    assert path.read_text() == "old\n"
    assert leftovers(tmp_path) == []


def test_atomic_file_binary_keeps_the_old_content_and_no_temporary_on_an_exception(tmp_path):
    path = tmp_path / "out.bin"
    path.write_bytes(b"\x00old")
    with pytest.raises(Boom):
        with atomic_file(path, "wb") as f:
            f.write(b"\xffnew" * 10000)
            raise Boom
    assert path.read_bytes() == b"\x00old"
    assert leftovers(tmp_path) == []


def test_atomic_file_writes_bytes_and_text_whole_with_the_umask_mode(tmp_path):
    write_bytes(tmp_path / "a.bin", b"\x00\r\n\xff")
    write_text(tmp_path / "sub" / "a.txt", "one\ntwo\n")
    assert (tmp_path / "a.bin").read_bytes() == b"\x00\r\n\xff"
    assert (tmp_path / "sub" / "a.txt").read_bytes() == b"one\ntwo\n"
    mask = os.umask(0)
    os.umask(mask)
    assert (tmp_path / "a.bin").stat().st_mode & 0o777 == 0o666 & ~mask
    assert leftovers(tmp_path) == [] and leftovers(tmp_path / "sub") == []


def test_atomic_file_refuses_modes_it_cannot_make_atomic(tmp_path):
    for mode in ("a", "r", "ab", "w+"):
        with pytest.raises(ValueError, match="mode"):
            with atomic_file(tmp_path / "x", mode):
                pass
    assert list(tmp_path.iterdir()) == []


def test_atomic_file_os_error_is_one_line_naming_the_path_with_the_callers_message(tmp_path):
    (tmp_path / "a-file").write_text("x")
    path = tmp_path / "a-file" / "out.txt"
    with pytest.raises(UserError) as err:
        write_text(path, "text")
    assert str(err.value).startswith(f"{path}: cannot write (") and "\n" not in str(err.value)
    with pytest.raises(UserError, match=r"out.txt: gone \(.+\); kept"):
        with atomic_file(path, message="gone ({cause}); kept"):
            pass


def test_save_checkpoint_failing_write_keeps_the_old_checkpoint_and_says_so(tmp_path):
    resource = pytest.importorskip("resource")
    from mtkit.checkpoint import load_checkpoint, remove_stray_temps, save_checkpoint

    path = tmp_path / "step_00000001.pt"
    save_checkpoint({"model": {"w": torch.ones(3)}, "config": {}, "vocab": {}, "step": 1}, path)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, hard))  # Python ignores SIGXFSZ: writes fail, EFBIG
    try:
        with pytest.raises(UserError) as err:
            save_checkpoint({"model": {"w": torch.zeros(100_000)}, "config": {}, "vocab": {}, "step": 2},
                            path)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert str(err.value) == (f"{path}: cannot write checkpoint (file too large (file-size limit)); "
                              "the checkpoints already on disk are untouched")
    assert torch.equal(load_checkpoint(path)["model"]["w"], torch.ones(3))
    assert leftovers(tmp_path) == []
    (tmp_path / f".{path.name}.abc123.tmp").write_bytes(b"PK")  # as a SIGKILLed save leaves it
    assert [p.name for p in remove_stray_temps(tmp_path)] == [f".{path.name}.abc123.tmp"]
    assert leftovers(tmp_path) == []


# atomic_dir

def make_old(tmp_path: Path) -> Path:
    out = tmp_path / "out"
    out.mkdir()
    (out / "model.bin").write_bytes(b"old model")
    (out / "notes.txt").write_text("the user's own")
    return out


def test_atomic_dir_leaves_the_old_directory_and_no_temporary_on_an_exception(tmp_path):
    out = make_old(tmp_path)
    before = listing(out)
    with pytest.raises(Boom):
        with atomic_dir(out) as tmp:
            assert tmp.parent == tmp_path and tmp.name == f".out.{os.getpid()}.tmp" and tmp.is_dir()
            (tmp / "model.bin").write_bytes(b"new model")
            raise Boom
    assert listing(out) == before
    assert leftovers(tmp_path) == []


def test_atomic_dir_os_error_in_the_block_is_one_line_and_the_old_directory_stays(tmp_path):
    out = make_old(tmp_path)
    before = listing(out)
    with pytest.raises(UserError, match=r"out: cannot write \(no such file or directory\); the previous"):
        with atomic_dir(out) as tmp:
            (tmp / "missing" / "x").write_text("x")
    assert listing(out) == before
    assert leftovers(tmp_path) == []


def test_atomic_dir_replaces_the_whole_directory_on_success(tmp_path):
    out = make_old(tmp_path)
    with atomic_dir(out) as tmp:
        (tmp / "model.bin").write_bytes(b"new model")
        (tmp / "sub").mkdir()
        (tmp / "sub" / "x").write_text("x")
    assert sorted(p.name for p in out.iterdir()) == ["model.bin", "sub"]
    assert (out / "model.bin").read_bytes() == b"new model" and (out / "sub" / "x").read_text() == "x"
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("existing", ["absent", "empty"])
def test_atomic_dir_makes_an_absent_or_empty_directory(tmp_path, existing):
    out = tmp_path / "deep" / "out"
    if existing == "empty":
        out.mkdir(parents=True)
    with atomic_dir(out) as tmp:
        (tmp / "a").write_text("a")
    assert listing(out) == {"a": b"a"}
    assert leftovers(out.parent) == []


def test_atomic_dir_replace_only_keeps_the_users_files(tmp_path):
    out = make_old(tmp_path)
    (out / "config.json").write_text("{}")  # a previous export's file the new one does not write
    with atomic_dir(out, replace_only=lambda p: p.name in ("model.bin", "config.json")) as tmp:
        (tmp / "model.bin").write_bytes(b"new model")
    assert listing(out) == {"model.bin": b"new model", "notes.txt": b"the user's own"}
    assert leftovers(tmp_path) == []


def test_atomic_dir_replace_only_puts_everything_back_when_moving_in_fails(tmp_path, monkeypatch):
    out = make_old(tmp_path)
    before = listing(out)
    real = os.replace

    def failing(src, dst):
        if Path(src).parent.name.endswith(".tmp") and Path(src).name == "second":
            raise OSError(28, "No space left on device")
        real(src, dst)

    monkeypatch.setattr(os, "replace", failing)
    with pytest.raises(UserError, match=r"out: cannot write \(no space left on the device\)"):
        with atomic_dir(out, replace_only=lambda p: p.name == "model.bin") as tmp:
            (tmp / "model.bin").write_bytes(b"new model")
            (tmp / "second").write_text("x")
    assert listing(out) == before
    assert leftovers(tmp_path) == []


def test_atomic_dir_refuses_a_file_in_the_way(tmp_path):
    (tmp_path / "out").write_text("a file")
    with pytest.raises(UserError, match="exists and is not a directory"):
        with atomic_dir(tmp_path / "out"):
            pass
    assert (tmp_path / "out").read_text() == "a file" and leftovers(tmp_path) == []


# pictures

@pytest.fixture
def failing_savefig(monkeypatch):
    """matplotlib's Figure.savefig writes part of a PNG, then fails."""
    pytest.importorskip("matplotlib")
    from matplotlib.figure import Figure

    def savefig(self, fname, **kwargs):
        fname.write(b"\x89PNG half a picture")
        raise Boom

    monkeypatch.setattr(Figure, "savefig", savefig)


def open_figures() -> list[int]:
    import matplotlib.pyplot as plt
    return plt.get_fignums()


def test_save_heatmap_failure_leaves_the_old_picture_and_no_temporary(tmp_path, failing_savefig):
    from mtkit.attention import save_heatmap

    path = tmp_path / "000001.png"
    path.write_bytes(b"old picture")
    with pytest.raises(Boom):
        save_heatmap(torch.full((3, 3), 1 / 3), ["a", "b"], ["x", "y"], path, "title")
    assert path.read_bytes() == b"old picture"
    assert leftovers(tmp_path) == [] and list(tmp_path.iterdir()) == [path]
    assert open_figures() == []


def test_plot_curves_failure_leaves_the_old_picture_and_no_temporary(tmp_path, failing_savefig):
    from mtkit.curves import plot_curves

    log = tmp_path / "log.jsonl"
    log.write_text('{"step": 1, "loss": 2.0, "nll": 2.0, "lr": 0.001}\n'
                   '{"step": 1, "valid_loss": 2.5, "valid_bleu": 1.0}\n')
    out = tmp_path / "curves.png"
    out.write_bytes(b"old picture")
    with pytest.raises(Boom):
        plot_curves(log, out)
    assert out.read_bytes() == b"old picture"
    assert leftovers(tmp_path) == [] and sorted(tmp_path.iterdir()) == [out, log]
    assert open_figures() == []


def test_pictures_are_written_whole_as_png(tmp_path):
    pytest.importorskip("matplotlib")
    from mtkit.attention import save_heatmap
    from mtkit.curves import plot_curves

    save_heatmap(torch.full((2, 2), 0.5), ["a"], ["x"], tmp_path / "heat.png")
    log = tmp_path / "log.jsonl"
    log.write_text('{"step": 1, "loss": 2.0, "nll": 2.0, "lr": 0.001}\n')
    plot_curves(log, tmp_path / "curves.png")
    for name in ("heat.png", "curves.png"):
        assert (tmp_path / name).read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    assert leftovers(tmp_path) == [] and open_figures() == []


# readers

def test_open_text_reads_gz_and_plain_identically(tmp_path):
    data = "één\nline with a\rstray CR and \u2028 inside\r\nlast without newline".encode()
    (tmp_path / "a.txt").write_bytes(data)
    (tmp_path / "a.txt.gz").write_bytes(gzip.compress(data))
    with open_text(tmp_path / "a.txt") as plain, open_text(tmp_path / "a.txt.gz") as gz:
        plain_lines, gz_lines = list(plain), list(gz)
    assert plain_lines == gz_lines == ["één\n", "line with a\rstray CR and \u2028 inside\r\n",
                                       "last without newline"]
    with open_bytes(tmp_path / "a.txt") as plain, open_bytes(tmp_path / "a.txt.gz") as gz:
        assert plain.read() == gz.read() == data


def test_open_bytes_errors_are_one_line_at_open(tmp_path):
    with pytest.raises(UserError, match=r"nowhere.gz: file not found$"):
        open_bytes(tmp_path / "nowhere.gz")
    (tmp_path / "fake.gz").write_bytes(b"not gzip at all")
    with pytest.raises(UserError, match=r"fake.gz: cannot read \("):
        open_bytes(tmp_path / "fake.gz")
    with pytest.raises(UserError, match=r"cannot read \("):
        open_bytes(tmp_path)
