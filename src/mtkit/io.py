"""Safe file work: whole-or-absent text files, the lock that keeps one process per run or
prepared directory, and operating-system errors as one line naming the file and the cause."""

from __future__ import annotations

import errno
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

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


@contextmanager
def atomic_file(path: str | Path, mode: str = "w") -> Iterator:
    """A file object whose content replaces `path` only when the block ends without error: a
    temporary sibling, fsync, rename. A failure leaves `path` as it was and no temporary file;
    an OS error is one UserError naming `path` and the cause."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8", "newline": "\n"})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, file_mode())
        os.replace(tmp, path)
    except OSError as exc:
        raise UserError(f"{path}: cannot write ({cause(exc)}); the previous file, if any, is untouched") from None
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)


def write_text(path: str | Path, text: str) -> None:
    """Write a whole text file atomically (see `atomic_file`)."""
    with atomic_file(path) as f:
        f.write(text)


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
