"""Safe file work, the one place for it: whole-or-absent files and directories, plain-or-gzip
readers, the lock that keeps one process per run or prepared directory, and operating-system
errors as one line naming the file and the cause."""

from __future__ import annotations

import errno
import gzip
import io
import os
import re
import shutil
import tempfile
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, BinaryIO, TextIO

from mtkit.errors import UserError

try:
    import fcntl
except ImportError:  # not POSIX: no advisory locks; directories are then not guarded
    fcntl = None

_CAUSES = {errno.ENOSPC: "no space left on the device", errno.EROFS: "read-only file system",
           errno.EACCES: "permission denied", errno.EPERM: "operation not permitted",
           errno.EDQUOT: "disk quota exceeded", errno.EFBIG: "file too large (file-size limit)",
           errno.ENOTDIR: "a part of the path is a file", errno.ENOENT: "no such file or directory"}


def cause(exc: BaseException) -> str:
    """What went wrong, in a few words: 'no space left on the device', 'read-only file system'."""
    if isinstance(exc, OSError) and exc.errno in _CAUSES:
        return _CAUSES[exc.errno]
    text = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
    return text.splitlines()[0][:200]


def umask() -> int:
    """The process's umask (read by setting and restoring it)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def file_mode() -> int:
    """The mode a new file gets under the umask (mkstemp makes files 0600 whatever it is)."""
    return 0o666 & ~umask()


TMP_SUFFIX = ".tmp"  # every temporary file or directory here is `.{name}.<something>.tmp`
WRITE_FAILED = "cannot write ({cause}); the previous file, if any, is untouched"


def fsync_directory(directory: str | Path) -> None:
    """Make a rename in `directory` durable (POSIX); a no-op where directories cannot be opened."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_file(path: str | Path, mode: str = "w", *, message: str = WRITE_FAILED) -> Iterator[IO[Any]]:
    """A file object whose content replaces `path` only when the block ends without error: a
    temporary sibling `.{name}.XXXX.tmp`, fsync, rename, and an fsync of the directory so the
    rename survives a power cut. `mode` is "w" (UTF-8 text, '\\n' line ends) or
    "wb" (bytes). A failure leaves `path` as it was and no temporary file; an OS error is one
    UserError, `{path}: ` + `message` with `{cause}` filled in."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_file: mode must be 'w' or 'wb', not {mode!r}")
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TMP_SUFFIX, dir=path.parent)
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8", "newline": "\n"})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, file_mode())  # as any file the user makes (mkstemp's are private)
        os.replace(tmp, path)
        tmp = None
        fsync_directory(path.parent)
    except OSError as exc:
        raise UserError(f"{path}: " + message.format(cause=cause(exc))) from None
    finally:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)


def write_text(path: str | Path, text: str) -> None:
    """Write a whole text file atomically (see `atomic_file`)."""
    with atomic_file(path) as f:
        f.write(text)


def write_bytes(path: str | Path, data: bytes) -> None:
    """Write a whole binary file atomically (see `atomic_file`)."""
    with atomic_file(path, "wb") as f:
        f.write(data)


@contextmanager
def atomic_dir(path: str | Path, replace_only: Callable[[Path], bool] | None = None) -> Iterator[Path]:
    """A fresh temporary sibling directory `.{name}.{pid}.tmp` for the block to fill; when the
    block ends without error its content takes the place of `path`, else it is removed and `path`
    is as it was. An OS error is one UserError naming `path` and the cause.

    An absent or empty `path` is replaced by the directory. Otherwise, without `replace_only`, the
    old directory is moved aside and removed once the new one is in place; with it, `path` stays
    and only its entries for which `replace_only(entry)` holds, and those of the same names as the
    new files, are replaced (others, such as the user's own files, are left).
    """
    path = Path(path)
    _check_dir(path)
    tmp = path.parent / f".{path.name}.{os.getpid()}{TMP_SUFFIX}"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # left by a killed process that had this pid
        tmp.mkdir()  # mkdir, unlike mkdtemp, honours the umask
    except OSError as exc:
        raise UserError(f"{path}: cannot write ({cause(exc)})") from None
    try:
        yield tmp
        _install_dir(tmp, path, replace_only)
        fsync_directory(path.parent)
    except OSError as exc:
        raise UserError(f"{path}: cannot write ({cause(exc)}); the previous directory, if any, "
                        "is untouched") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def atomic_dir_leftovers(path: str | Path, kind: str) -> list[Path]:
    """What `atomic_dir` calls left beside `path` when their process was killed: the temporary
    directories (`kind` "tmp") or an old copy moved aside during the swap ("old")."""
    path = Path(path)
    pattern = re.compile(rf"\.{re.escape(path.name)}\.\d+\.{kind}")
    return sorted(p for p in path.parent.glob(f".{path.name}.*.{kind}") if pattern.fullmatch(p.name))


def _check_dir(path: Path) -> None:
    if path.exists() and not path.is_dir():
        raise UserError(f"{path}: exists and is not a directory")


def _install_dir(tmp: Path, path: Path, replace_only: Callable[[Path], bool] | None) -> None:
    """Put the finished directory `tmp` in place of `path` (see `atomic_dir`); undone on failure."""
    _check_dir(path)
    empty = path.is_dir() and not path.is_symlink() and not any(path.iterdir())
    if empty or not (path.exists() or path.is_symlink()):
        if empty and os.name == "nt":  # POSIX renames onto an empty directory, Windows does not
            path.rmdir()
        os.replace(tmp, path)
        return
    old = path.parent / f".{path.name}.{os.getpid()}.old"  # see atomic_dir_leftovers
    shutil.rmtree(old, ignore_errors=True)
    if replace_only is None:
        os.replace(path, old)
        try:
            os.replace(tmp, path)
        except BaseException:
            os.replace(old, path)
            raise
        shutil.rmtree(old, ignore_errors=True)
        return
    new = [entry.name for entry in tmp.iterdir()]
    stale = {e.name for e in path.iterdir() if replace_only(e) or e.name in new}
    old.mkdir()
    aside, placed = [], []
    try:
        for name in sorted(stale):
            os.replace(path / name, old / name)
            aside.append(name)
        for name in new:
            os.replace(tmp / name, path / name)
            placed.append(name)
    except BaseException:  # put back what was there; `old` is kept if even that fails
        for name in reversed(placed):
            os.replace(path / name, tmp / name)
        for name in reversed(aside):
            os.replace(old / name, path / name)
        old.rmdir()
        raise
    shutil.rmtree(old, ignore_errors=True)


def open_bytes(path: str | Path) -> BinaryIO:
    """A plain file, or a gzipped one (by its `.gz` suffix), opened for binary reading. A missing or
    unreadable file (a directory, a bad gzip header) is one UserError now, not half-way."""
    path = Path(path)
    stream = None
    try:
        stream = gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")  # returned open
        stream.peek(1)
    except FileNotFoundError:
        raise UserError(f"{path}: file not found") from None
    except (OSError, EOFError, zlib.error) as exc:
        if stream is not None:
            stream.close()
        raise UserError(f"{path}: cannot read ({cause(exc)})") from None
    return stream


def open_text(path: str | Path, errors: str = "strict") -> TextIO:
    """A plain or gzipped UTF-8 file opened for reading text (see `open_bytes`); lines end at '\\n'
    alone, so a stray '\\r' or U+2028 inside a line never splits it."""
    return io.TextIOWrapper(open_bytes(path), encoding="utf-8", errors=errors, newline="\n")


@contextmanager
def exclusive(lock_path: str | Path, what: str, remove: bool = False) -> Iterator[None]:
    """Hold an OS lock on `lock_path` for the block, so no other mtkit process works on `what`
    meanwhile. The kernel releases it when the process ends, however (SIGKILL too): it never goes
    stale. A lock held by a live process is one UserError naming its pid; nothing overrides it.
    `remove`: delete the lock file at the end (for a lock beside the user's files rather than in a
    directory mtkit owns)."""
    lock_path = Path(lock_path)
    if fcntl is None:
        yield
        return
    try:
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise UserError(f"{lock_path.parent}: cannot use this directory ({cause(exc)})") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            raise UserError(f"{what}: in use by another mtkit process (pid {holder}); wait for it to end or "
                            "stop it (--force does not override this)") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        try:
            yield
        finally:
            if remove:  # while still held: a process that opened the file meanwhile was refused
                lock_path.unlink(missing_ok=True)
    finally:
        os.close(fd)  # closing releases the lock
