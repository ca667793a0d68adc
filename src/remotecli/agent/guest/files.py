"""``PUT/GET /v1/files``: atomic writes with mode and owner, and reads."""

import contextlib
import errno
import grp
import os
import pwd
import stat
import tempfile

from .users import resolve_owner
from .wire import MAX_FILE_BYTES


def _no_space(exc, path):
    """A full filesystem (or quota) is its own stable code: the host tells the user their home is full."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        raise FileOpError(507, "no_space", f"No space left to write {path}.") from None


class FileOpError(Exception):
    def __init__(self, status, code, message):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


def check_path(path):
    if not isinstance(path, str) or not path:
        raise FileOpError(400, "invalid_request", "path must be a non-empty string.")
    if "\0" in path or not path.startswith("/"):
        raise FileOpError(400, "invalid_path", "path must be an absolute path.")
    normal = os.path.normpath(path)
    if normal == "/" or path.endswith("/"):
        raise FileOpError(400, "invalid_path", "path must name a file, not a directory.")
    return normal


def _make_parents(directory, owner_ids, dir_mode):
    missing = []
    current = directory
    while not os.path.isdir(current):
        if os.path.lexists(current):
            raise FileOpError(409, "not_a_directory", f"{current} exists and is not a directory.")
        missing.append(current)
        current = os.path.dirname(current)
    for path in reversed(missing):
        try:
            os.mkdir(path, dir_mode)
        except FileExistsError:
            if not os.path.isdir(path):
                raise FileOpError(409, "not_a_directory", f"{path} exists and is not a directory.") from None
            continue
        os.chmod(path, dir_mode)  # not subject to the umask
        if owner_ids is not None:
            os.chown(path, *owner_ids)


def _fsync_dir(directory):
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_file(path, data, mode, owner=None, dir_mode=0o755):
    """Atomically replace ``path``: temp file in the same directory, chown+chmod, fsync, rename."""
    path = check_path(path)
    if len(data) > MAX_FILE_BYTES:
        raise FileOpError(413, "file_too_large", f"Files are limited to {MAX_FILE_BYTES} bytes.")
    owner_ids = resolve_owner(owner) if owner is not None else None
    directory, name = os.path.split(path)
    if os.path.isdir(path):
        raise FileOpError(409, "is_a_directory", f"{path} is a directory.")
    try:
        _make_parents(directory, owner_ids, dir_mode)
        fd, temp_path = tempfile.mkstemp(prefix=f".{name}.", suffix=".rcli-tmp", dir=directory)
    except PermissionError:
        raise FileOpError(403, "permission_denied", f"Cannot create files in {directory}.") from None
    except OSError as exc:
        _no_space(exc, directory)
        raise FileOpError(
            500, "write_failed", f"Cannot create a file in {directory}: {exc.strerror}."
        ) from None
    try:
        try:
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            if owner_ids is not None:
                os.fchown(fd, *owner_ids)
            os.fchmod(fd, mode)  # after fchown: chown clears set-id bits
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temp_path, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(temp_path)
        _no_space(exc, path)
        raise FileOpError(500, "write_failed", f"Cannot write {path}: {exc.strerror}.") from None
    with contextlib.suppress(OSError):
        _fsync_dir(directory)
    return describe(path, os.stat(path))


def describe(path, st):
    try:
        owner = pwd.getpwuid(st.st_uid).pw_name
    except KeyError:
        owner = str(st.st_uid)
    try:
        group = grp.getgrgid(st.st_gid).gr_name
    except KeyError:
        group = str(st.st_gid)
    return {
        "path": path,
        "mode": stat.S_IMODE(st.st_mode),
        "owner": owner,
        "group": group,
        "uid": st.st_uid,
        "gid": st.st_gid,
        "size": st.st_size,
    }


def read_file(path):
    path = check_path(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOCTTY | os.O_NONBLOCK)
    except FileNotFoundError:
        raise FileOpError(404, "file_not_found", f"{path} does not exist.") from None
    except NotADirectoryError:
        raise FileOpError(404, "file_not_found", f"{path} does not exist.") from None
    except PermissionError:
        raise FileOpError(403, "permission_denied", f"Cannot read {path}.") from None
    except OSError as exc:
        raise FileOpError(500, "read_failed", f"Cannot read {path}: {exc.strerror}.") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise FileOpError(400, "not_a_file", f"{path} is not a regular file.")
        if st.st_size > MAX_FILE_BYTES:
            raise FileOpError(413, "file_too_large", f"Files are limited to {MAX_FILE_BYTES} bytes.")
        os.set_blocking(fd, True)
        chunks = []
        total = 0
        while True:
            chunk = os.read(fd, 1024 * 1024)
            if not chunk:
                break
            total += len(chunk)
            if total > MAX_FILE_BYTES:
                raise FileOpError(413, "file_too_large", f"Files are limited to {MAX_FILE_BYTES} bytes.")
            chunks.append(chunk)
    except OSError as exc:
        raise FileOpError(500, "read_failed", f"Cannot read {path}: {exc.strerror}.") from None
    finally:
        os.close(fd)
    info = describe(path, st)
    data = b"".join(chunks)
    info["size"] = len(data)
    return info, data
