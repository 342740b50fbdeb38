"""Atomic file writes: a crash mid-write leaves the previous file (or none), never half of one."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator

__all__ = ["ClaimedError", "atomic_path", "atomic_write_json", "atomic_write_text", "claim", "claim_for", "file_stamp",
           "is_remote", "new_file_mode", "to_jsonable", "unused_path"]


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it replaces ``path`` in one step.

    The temporary file lives in the same directory, so ``os.replace`` is an
    atomic rename on POSIX and Windows. On an exception the temporary file is
    removed and ``path`` is untouched.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as error:  # name the file the user asked for, not the hidden temporary one
        raise OSError(error.errno, f"cannot write {path}: {error.strerror or error}") from error
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        try:
            yield tmp_path
        except OSError as error:
            raise OSError(error.errno, f"cannot write {path}: {error.strerror or error}") from error
        with open(tmp_path, "rb+") as handle:  # data on disk before the rename makes it visible
            os.fsync(handle.fileno())
        # mkstemp creates the file 0600; give it the mode the file has, or a new file would get
        os.chmod(tmp_path, path.stat().st_mode & 0o7777 if path.exists() else new_file_mode())
        try:
            os.replace(tmp_path, path)
        except OSError as error:
            raise OSError(error.errno, f"cannot write {path}: {error.strerror or error}") from error
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def is_remote(path: str | os.PathLike) -> bool:
    """A URL (``s3://``, ``https://``) or a ``pipe:`` command, as webdataset opens them, not a local file."""
    return "://" in str(path) or str(path).startswith("pipe:")


def file_stamp(path: str | os.PathLike) -> list:
    """``[path, size, mtime_ns]`` of a local file (a URL: ``[url]``): what must not change under a resume."""
    if is_remote(path):
        return [str(path)]
    info = Path(path).stat()
    return [str(Path(path).resolve()), info.st_size, info.st_mtime_ns]


def new_file_mode() -> int:
    """``0o666`` less the process's umask (read by setting and restoring it)."""
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def to_jsonable(value: Any) -> Any:
    """Convert numpy / torch scalars and arrays, tuples and paths into JSON types."""
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):
        return to_jsonable(value.tolist())
    if isinstance(value, float) and value != value:
        return None  # JSON has no NaN
    return value


def atomic_write_json(path: str | os.PathLike, data: Any) -> Path:
    return atomic_write_text(path, json.dumps(to_jsonable(data), indent=2, sort_keys=False) + "\n")


def unused_path(path: str | os.PathLike) -> Path:
    """``path`` if nothing is there yet, else the first free ``<stem>-2<suffix>``, ``-3``, ...

    Used by scripts that write one result file per run, so that a second run
    never overwrites the first one's numbers.
    """
    path = Path(path)
    candidate, n = path, 1
    while candidate.exists():
        n += 1
        candidate = path.with_name(f"{path.stem}-{n}{path.suffix}")
    return candidate


class ClaimedError(ValueError):
    """Another live process holds the claim (a usage error: exit 2)."""


@contextlib.contextmanager
def claim(lock_path: str | os.PathLike, what: str) -> Iterator[Path]:
    """Hold ``lock_path`` as the one owner of ``what`` (a run folder, an output) while the block runs.

    The claim is an exclusive ``flock`` on the file, which the kernel releases when the holder exits or dies,
    so a killed run leaves no stale claim on this machine; the file holds the holder's process id, host and
    start time for the message a second process gets. On a network file system that does not honour
    ``flock`` across hosts two hosts are not kept apart.

    Raises:
        ClaimedError: another process holds it (its pid, host and start time named).
    """
    import fcntl
    import socket
    import time

    lock_path = Path(lock_path)
    while True:
        handle = open(lock_path, "a+", encoding="utf-8")
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise ClaimedError(f"{what} is in use by {holder} (lock {lock_path}); wait for it to finish") from None
        # The holder before us unlinks the file as it leaves: a lock on that unlinked file would not keep out
        # a process that opens the path afresh, so only a lock on the file the path still names counts.
        try:
            same_file = os.path.samestat(os.fstat(handle.fileno()), os.stat(lock_path))
        except FileNotFoundError:
            same_file = False
        if same_file:
            break
        handle.close()
    try:
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on {socket.gethostname()}, started "
                     f"{time.strftime('%Y-%m-%d %H:%M:%S')}")
        handle.flush()
        try:
            yield lock_path
        finally:
            lock_path.unlink(missing_ok=True)  # before the release: a waiting process finds no half-stale file
    finally:
        handle.close()


def claim_for(target: str | os.PathLike, what: str):
    """:func:`claim` of ``target`` (a run folder, an output file) through a lock file outside the user's folders
    (``<tmp>/halo-embed-claims/<hash of the absolute path>.lock``): checking ownership writes nothing where
    the run would write, and needs no folder to exist yet. Processes of one machine are kept apart."""
    import hashlib
    import tempfile

    key = hashlib.sha1(os.fspath(Path(target).resolve()).encode()).hexdigest()[:24]
    folder = Path(tempfile.gettempdir()) / "halo-embed-claims"
    try:
        folder.mkdir()
        folder.chmod(0o1777)  # shared by every user of the machine, like /tmp itself
    except FileExistsError:
        pass
    return claim(folder / f"{key}.lock", what)
