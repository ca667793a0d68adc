"""Home volumes as files on the host (the qemu and firecracker drivers; ADR 0011).

A volume is a sparse file holding an ext4 filesystem, made with the host's ``mkfs.ext4``. It is
written under a temporary name and linked into place, so a volume file either does not exist or
is complete, and an existing volume is never formatted again: ``create_ext4_file`` refuses. A
temporary file a maker that died left behind is removed by the volume's next maker.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import time
import uuid
from pathlib import Path

from remotecli.errors import DriverError, DriverUnavailable

EXT4_MAGIC = 0xEF53
_SUPERBLOCK_OFFSET = 1024
_MAGIC_OFFSET = _SUPERBLOCK_OFFSET + 0x38
LABEL = "rc-home"
#: A temporary file of a volume this old belongs to a maker that died mid-mkfs (mkfs of a sparse
#: image takes about a second); the next maker of that volume removes it.
STALE_TMP_S = 120.0


def _mkfs() -> str:
    path = shutil.which("mkfs.ext4") or next(
        (p for p in ("/usr/sbin/mkfs.ext4", "/sbin/mkfs.ext4") if os.access(p, os.X_OK)), None
    )
    if path is None:
        raise DriverUnavailable("mkfs.ext4 is not installed; install it with 'apt-get install e2fsprogs'.")
    return path


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def create_ext4_file(path: Path, size_bytes: int, *, owner_uid: int, owner_gid: int | None = None) -> None:
    """A new sparse ext4 image of ``size_bytes`` at ``path`` whose root directory belongs to
    ``owner_uid``. Raises ``DriverError`` if ``path`` exists (never formats over a volume)."""
    if path.exists() or path.is_symlink():
        raise DriverError(
            "A workspace volume already exists there; it is never formatted again.",
            log_detail=f"refusing to create {path}: it exists",
        )
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    _remove_stale_temporaries(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        os.ftruncate(fd, size_bytes)  # sparse: only what the filesystem writes takes space
    finally:
        os.close(fd)
    gid = owner_uid if owner_gid is None else owner_gid
    try:
        proc = subprocess.run(
            [_mkfs(), "-q", "-F", "-t", "ext4", "-L", LABEL, "-m", "0", "-E", f"root_owner={owner_uid}:{gid}",
             str(tmp)],
            capture_output=True, text=True, timeout=300, check=False,
        )
        if proc.returncode != 0:
            raise DriverError("The workspace volume could not be formatted.",
                              log_detail=f"mkfs.ext4 {tmp}: exit {proc.returncode}: {proc.stderr.strip()[-500:]}")
        fd = os.open(tmp, os.O_RDONLY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(tmp, path)  # fails if a volume appeared meanwhile: never replaced
        except FileExistsError:
            raise DriverError("A workspace volume already exists there; it is never formatted again.",
                              log_detail=f"{path} appeared while formatting") from None
        _fsync_dir(path.parent)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def _remove_stale_temporaries(path: Path) -> None:
    """Temporary files of ``path`` left by a maker that died mid-mkfs (older than ``STALE_TMP_S``)."""
    now = time.time()
    for stale in path.parent.glob(f".{path.name}.*.tmp"):
        with contextlib.suppress(OSError):
            if now - stale.stat().st_mtime > STALE_TMP_S:
                stale.unlink()


def file_problem(path: Path) -> str | None:
    """None when ``path`` is a readable, writable ext4 image; else what is wrong, in words."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return f"its volume file {path} is missing"
    except OSError as exc:
        return f"its volume file {path} cannot be read ({exc.strerror})"
    if not path.is_file():
        return f"its volume {path} is not a regular file"
    if not os.access(path, os.R_OK | os.W_OK):
        return f"its volume file {path} is not readable and writable by the controller"
    if st.st_size < _MAGIC_OFFSET + 2:
        return f"its volume file {path} is truncated ({st.st_size} bytes)"
    try:
        with open(path, "rb") as handle:
            handle.seek(_MAGIC_OFFSET)
            magic = int.from_bytes(handle.read(2), "little")
    except OSError as exc:
        return f"its volume file {path} cannot be read ({exc.strerror})"
    if magic != EXT4_MAGIC:
        return f"its volume file {path} holds no ext4 filesystem"
    return None


def file_usage(path: Path) -> tuple[int, int] | None:
    """(bytes the sparse file takes on the host, its size), or None."""
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_blocks * 512, st.st_size
