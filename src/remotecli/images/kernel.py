"""Kernel + initramfs: pick modules out of Debian's cloud kernel and pack a busybox initramfs.

Pure Python (no host ``cpio``/``depmod`` needed): module dependencies come from each module's
``.modinfo`` ``depends=`` field, xz/zstd/gzip-compressed modules are decompressed on the host
(busybox ``insmod`` cannot load compressed modules), and the archive is a ``newc`` cpio
compressed with gzip. The output is deterministic for the same inputs (fixed mtimes, sorted).
"""

from __future__ import annotations

import gzip
import io
import lzma
import stat
from dataclasses import dataclass
from pathlib import Path

from remotecli.errors import RemotecliError


class KernelLayoutError(RemotecliError):
    code = "image_build_failed"
    default_message = "The kernel package does not look as expected; see the build log."


@dataclass(frozen=True)
class KernelTree:
    version: str
    vmlinuz: Path
    modules_dir: Path  # .../lib/modules/<version>


def find_kernel(root: Path) -> KernelTree:
    """Locate vmlinuz and the modules directory in an extracted linux-image package."""
    candidates = sorted((root / "boot").glob("vmlinuz-*"))
    if not candidates:
        raise KernelLayoutError(log_detail=f"no boot/vmlinuz-* under {root}")
    vmlinuz = candidates[-1]
    version = vmlinuz.name.removeprefix("vmlinuz-")
    for base in (root / "usr" / "lib" / "modules", root / "lib" / "modules"):
        if (base / version).is_dir():
            return KernelTree(version=version, vmlinuz=vmlinuz, modules_dir=base / version)
    raise KernelLayoutError(log_detail=f"no modules directory for {version} under {root}")


def _norm(name: str) -> str:
    return name.replace("-", "_")


def _module_name(path: Path) -> str:
    name = path.name
    for suffix in (".xz", ".zst", ".gz"):
        name = name.removesuffix(suffix)
    return _norm(name.removesuffix(".ko"))


def read_module(path: Path) -> bytes:
    data = path.read_bytes()
    if path.name.endswith(".xz"):
        return lzma.decompress(data)
    if path.name.endswith(".gz"):
        return gzip.decompress(data)
    if path.name.endswith(".zst"):
        raise KernelLayoutError(log_detail=f"zstd-compressed module {path} is not supported")
    return data


def module_depends(data: bytes) -> list[str]:
    """The ``depends=`` list from a module's .modinfo strings."""
    marker = b"\x00depends="
    pos = data.find(marker)
    if pos < 0:
        return []
    start = pos + len(marker)
    end = data.find(b"\x00", start)
    value = data[start:end].decode("ascii", errors="replace")
    return [_norm(item) for item in value.split(",") if item]


def builtin_modules(modules_dir: Path) -> set[str]:
    path = modules_dir / "modules.builtin"
    if not path.is_file():
        return set()
    return {_module_name(Path(line.strip())) for line in path.read_text().splitlines() if line.strip()}


def resolve_modules(modules_dir: Path, wanted: tuple[str, ...]) -> list[tuple[str, bytes]]:
    """(name, uncompressed .ko) for the wanted modules and their dependencies, dependencies first.

    Modules built into the kernel are skipped silently (nothing to load).
    """
    index: dict[str, Path] = {}
    for path in (modules_dir / "kernel").rglob("*.ko*"):
        index.setdefault(_module_name(path), path)
    builtin = builtin_modules(modules_dir)
    ordered: list[tuple[str, bytes]] = []
    seen: set[str] = set()

    def visit(name: str, chain: tuple[str, ...]) -> None:
        name = _norm(name)
        if name in seen or name in builtin:
            return
        if name in chain:
            raise KernelLayoutError(log_detail=f"module dependency cycle: {' -> '.join((*chain, name))}")
        path = index.get(name)
        if path is None:
            raise KernelLayoutError(
                f"Kernel module {name!r} is neither built in nor shipped by the kernel package.",
                log_detail=f"modules dir {modules_dir}",
            )
        data = read_module(path)
        for dep in module_depends(data):
            visit(dep, (*chain, name))
        seen.add(name)
        ordered.append((name, data))

    for name in wanted:
        visit(name, ())
    return ordered


class CpioWriter:
    """Minimal ``newc`` (SVR4 without CRC) cpio writer, enough for an initramfs."""

    def __init__(self) -> None:
        self._buf = io.BytesIO()
        self._ino = 1

    def _entry(self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)) -> None:
        encoded = name.encode() + b"\x00"
        fields = [
            self._ino,  # ino
            mode,
            0,  # uid
            0,  # gid
            1,  # nlink
            0,  # mtime (fixed for reproducibility)
            len(data),
            0,  # devmajor
            0,  # devminor
            rdev[0],
            rdev[1],
            len(encoded),
            0,  # check
        ]
        self._ino += 1
        header = b"070701" + b"".join(f"{value:08x}".encode() for value in fields)
        self._buf.write(header)
        self._buf.write(encoded)
        self._pad()
        self._buf.write(data)
        self._pad()

    def _pad(self) -> None:
        remainder = self._buf.tell() % 4
        if remainder:
            self._buf.write(b"\x00" * (4 - remainder))

    def directory(self, name: str, mode: int = 0o755) -> None:
        self._entry(name, stat.S_IFDIR | mode)

    def file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        self._entry(name, stat.S_IFREG | mode, data)

    def symlink(self, name: str, target: str) -> None:
        self._entry(name, stat.S_IFLNK | 0o777, target.encode())

    def char_device(self, name: str, major: int, minor: int, mode: int = 0o600) -> None:
        self._entry(name, stat.S_IFCHR | mode, rdev=(major, minor))

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0)
        remainder = self._buf.tell() % 512
        if remainder:
            self._buf.write(b"\x00" * (512 - remainder))
        return self._buf.getvalue()


def build_initramfs(busybox: bytes, init_script: bytes, modules: list[tuple[str, bytes]]) -> bytes:
    """A gzip-compressed cpio archive: /bin/busybox, /init, /lib/modules/*.ko and a load order."""
    cpio = CpioWriter()
    for directory in ("bin", "dev", "lib", "lib/modules", "newroot", "proc", "sys", "tmp"):
        cpio.directory(directory)
    # The kernel opens /dev/console for init's stdio before anything mounts devtmpfs.
    cpio.char_device("dev/console", 5, 1)
    cpio.char_device("dev/null", 1, 3, 0o666)
    cpio.file("bin/busybox", busybox, 0o755)
    cpio.symlink("bin/sh", "busybox")
    cpio.file("init", init_script, 0o755)
    for name, data in modules:
        cpio.file(f"lib/modules/{name}.ko", data)
    order = "".join(f"{name}\n" for name, _ in modules)
    cpio.file("lib/modules/load-order", order.encode())
    return gzip.compress(cpio.finish(), compresslevel=6, mtime=0)
