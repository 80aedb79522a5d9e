"""Atomic file and directory writes: a crash never leaves a half-written file. Files a run keeps
open or appends to are opened without following symbolic links (:func:`open_no_follow`)."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import struct
import shutil
import tempfile
from pathlib import Path
from typing import Iterator, Optional, Union

PathLike = Union[str, Path]


def link_refusal(path: PathLike) -> str:
    """Why a symbolic link at ``path`` in a run directory is refused, and what to do."""
    return (f"{path} is a symbolic link (to {os.readlink(path)}); a run never writes through links: remove it, "
            "or choose another output_dir")


def open_no_follow(path: PathLike, flags: int, mode: int = 0o644) -> int:
    """``os.open(path, flags)`` that refuses a symbolic link at ``path`` (``O_NOFOLLOW``): a link
    planted in a run directory must not make the run write elsewhere. Raises ``ConfigError``."""
    from ..errors import ConfigError

    try:
        return os.open(str(path), flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    except OSError as e:
        if e.errno != errno.ELOOP:
            raise
        raise ConfigError(link_refusal(path)) from None


def fsync_dir(path: PathLike) -> None:
    """Make a rename inside ``path`` durable."""
    try:
        fd = os.open(str(path), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def umask() -> int:
    """The process umask (read by setting it and back: there is no getter)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def writable_dir(directory: PathLike) -> bool:
    """A file can be created in ``directory`` (tried, not guessed: ``os.access`` says yes to root
    on a read-only or immutable directory). The probe file is gone at once."""
    if not os.access(directory, os.W_OK):
        return False
    try:
        with tempfile.TemporaryFile(dir=directory, prefix=".mlx_dpo-probe"):
            return True
    except OSError:
        return False


def unwritable_ancestor(path: PathLike) -> Optional[Path]:
    """None when ``path`` can be created or written where it is (its nearest existing ancestor,
    where a ``mkdir(parents=True)`` starts, is a writable directory); else that ancestor."""
    path = Path(path).expanduser().absolute()
    where = next(p for p in (path, *path.parents) if p.exists())
    return None if where.is_dir() and writable_dir(where) else where


def atomic_write_bytes(path: PathLike, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o666 & ~umask())  # mkstemp makes 0600; this is the mode open() would give
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def atomic_write_text(path: PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def fsync_tree(path: PathLike) -> None:
    for root, _, files in os.walk(path):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                os.fsync(f.fileno())
        fsync_dir(root)


@contextlib.contextmanager
def atomic_directory(path: PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success fsync it and rename it to ``path``.

    On any exception the temporary directory is removed and ``path`` is untouched.
    With ``overwrite`` an existing ``path`` is replaced only after the new one is complete.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists")
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        os.chmod(tmp, 0o777 & ~umask())  # mkdtemp makes 0700; the directory gets the mode mkdir() would give
        yield tmp
        fsync_tree(tmp)
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            try:
                os.replace(tmp, path)
            except BaseException:
                os.replace(old, path)  # the old directory is kept
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def safetensors_problem(path: PathLike) -> Optional[str]:
    """What is wrong with the safetensors file ``path`` (truncated, not safetensors), or
    ``None``: reads only its header, so a broken file is named before anything loads it."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
            header = json.loads(f.read(n)) if 0 < n <= size - 8 else None
    except (OSError, ValueError) as e:  # ValueError: JSONDecodeError, UnicodeDecodeError
        return f"is not a safetensors file ({type(e).__name__})"
    if not isinstance(header, dict):
        return "is not a safetensors file (no valid header)"
    ends = [t["data_offsets"][1] for k, t in header.items() if k != "__metadata__" and isinstance(t, dict)
            and len(t.get("data_offsets") or ()) == 2]
    if max(ends, default=0) > size - 8 - n:
        return f"is truncated ({size} bytes, its header describes {8 + n + max(ends)}): an incomplete copy or download?"
    return None


def soft_rlimit(*names: str) -> Optional[int]:
    """The smallest soft limit of this process among the ``resource.RLIMIT_<name>`` of ``names``
    (``"FSIZE"``: ``ulimit -f``, ``"AS"``: ``ulimit -v``...), or None when none is set."""
    import resource

    limits = [resource.getrlimit(getattr(resource, f"RLIMIT_{n}"))[0] for n in names]
    limits = [x for x in limits if x != resource.RLIM_INFINITY]
    return min(limits) if limits else None


def file_size_limit() -> Optional[int]:
    """The process's file-size limit in bytes (``ulimit -f``), or None when there is none."""
    return soft_rlimit("FSIZE")


def write_failure(e: OSError) -> str:
    """What a failed write means and what to do, by its errno: a full disk, the file-size limit,
    or (anything else) the error itself."""
    if e.errno == errno.ENOSPC:
        return "the disk is full; free space"
    if e.errno == errno.EFBIG:
        limit = file_size_limit()
        return (f"a file reached the file-size limit ({'ulimit -f: ' + str(limit) + ' bytes' if limit else 'EFBIG'}); "
                "raise the limit")
    return f"{type(e).__name__}: {e}; fix the path or its permissions"


def save_safetensors(path: PathLike, arrays: dict, metadata: dict) -> None:
    """``mx.save_safetensors``, with a failed write (MLX raises ``RuntimeError``, e.g. on a
    full disk) raised as ``OSError`` like every other file error: ENOSPC when the disk is full,
    EFBIG when a file-size limit is set and the file would pass it, else EIO."""
    import mlx.core as mx

    try:
        mx.save_safetensors(str(path), arrays, metadata=metadata)
    except RuntimeError as e:
        try:
            full = shutil.disk_usage(Path(path).parent).free < (1 << 20)
        except OSError:
            full = False
        limit = file_size_limit()
        too_big = limit is not None and sum(a.nbytes for a in arrays.values()) >= limit
        code = errno.ENOSPC if full else errno.EFBIG if too_big else errno.EIO
        raise OSError(code, f"{os.strerror(code)} while writing {path} ({e})") from None
