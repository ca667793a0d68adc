"""Builds, finds, reports on and prunes guest images (layout: docs/decisions/0001).

::

    <images_dir>/kernel-<hash>/{vmlinuz,initrd.img,manifest.json,build.log}
    <images_dir>/<vm_type>-<hash>/{rootfs.ext4,manifest.json,build.log}
    <images_dir>/cache/tree-<vm_type>-<tree_hash>/{root/,tree.json,build.log}   slow stage
    <images_dir>/.tmp/…                                                          work in progress

Every output is built in ``.tmp/`` and renamed into place when complete, so a crash never leaves
a directory that looks built; a leftover ``.tmp`` entry is removed by the next build. One build
runs at a time (an ``flock`` on ``<images_dir>/.lock``).

The final stage writes the files it owns (``/sbin/remotecli-init``, ``/opt/remotecli/``,
``/etc/hostname``, ``/etc/hosts``, ``/etc/resolv.conf``) into the cached tree, replacing what a
previous final stage wrote there, and runs ``mkfs.ext4 -d``. The tree's other content depends on
the package recipe alone.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from remotecli.config import Settings
from remotecli.drivers.base import ImageRef
from remotecli.drivers.host import read_json_object
from remotecli.errors import ImageMissing, RemotecliError, UnknownVmType
from remotecli.images import cli_constants, hashing
from remotecli.images.kernel import build_initramfs, find_kernel, resolve_modules
from remotecli.images.recipes import KERNEL, RECIPES, ImageRecipe, KernelRecipe

# --------------------------------------------------------------------------------------------
# Errors


class BuildToolMissing(ImageMissing):
    """A host tool the builder needs is not installed; the message names the apt package."""

    code = "build_tool_missing"
    default_message = "A tool needed to build guest images is missing; run scripts/install-system-deps.sh."


class ImageBuildFailed(RemotecliError):
    code = "image_build_failed"
    http_status = 500
    default_message = "The guest image build failed; the build log says why."


# Host tools: command -> Debian package that provides it.
TOOL_PACKAGES: dict[str, str] = {
    "mmdebstrap": "mmdebstrap",
    "mkfs.ext4": "e2fsprogs",
    "npm": "npm",
    "qemu-system-x86_64": "qemu-system-x86",
    "qemu-img": "qemu-utils",
}


def find_tool(name: str) -> str | None:
    found = shutil.which(name)
    if found is None:
        for directory in ("/usr/sbin", "/sbin"):
            candidate = Path(directory) / name
            if candidate.is_file() and os.access(candidate, os.X_OK):
                return str(candidate)
    return found


def require_tool(name: str) -> str:
    path = find_tool(name)
    if path is None:
        package = TOOL_PACKAGES.get(name, name)
        raise BuildToolMissing(
            f"'{name}' is not installed; install it with 'apt-get install {package}' "
            "(or run scripts/install-system-deps.sh).",
            tool=name,
            package=package,
        )
    return path


def missing_tools() -> dict[str, str]:
    """Tools needed to build and run images that are not installed: {command: apt package}."""
    return {tool: package for tool, package in TOOL_PACKAGES.items() if find_tool(tool) is None}


# --------------------------------------------------------------------------------------------
# Progress and results


@dataclass(frozen=True)
class ProgressEvent:
    target: str  # "kernel", "cli", "browser"
    stage: str  # "check", "download", "mmdebstrap", "npm", "files", "mkfs", "done", "up_to_date"
    message: str
    percent: float | None = None  # of this target's build, when known


ProgressCallback = Callable[[ProgressEvent], None]


@dataclass(frozen=True)
class BuildResult:
    target: str
    status: Literal["built", "up_to_date"]
    hash: str
    seconds: float
    size_bytes: int  # bytes allocated on disk by the build's outputs
    path: Path
    message: str

    @property
    def built(self) -> bool:
        return self.status == "built"


@dataclass(frozen=True)
class ImageStatus:
    target: str  # "kernel", "cli", "browser"
    hash: str  # the hash the current recipe asks for
    built: bool
    path: Path
    size_bytes: int | None = None
    built_at: str | None = None
    versions: dict[str, str] = field(default_factory=dict)
    other_builds: tuple[str, ...] = ()  # hashes of older builds still on disk (prunable)


# --------------------------------------------------------------------------------------------
# Paths


def kernel_dir(settings: Settings, digest: str) -> Path:
    return settings.images_dir / f"kernel-{digest}"


def image_dir(settings: Settings, vm_type: str, digest: str) -> Path:
    return settings.images_dir / f"{vm_type}-{digest}"


def tree_dir(settings: Settings, vm_type: str, digest: str) -> Path:
    return settings.images_dir / "cache" / f"tree-{vm_type}-{digest}"


def _recipe(vm_type: str) -> ImageRecipe:
    try:
        return RECIPES[vm_type]
    except KeyError:
        raise UnknownVmType(f"Unknown VM type {vm_type!r}; known types: {', '.join(RECIPES)}.") from None


def current_hashes(vm_type: str) -> tuple[str, str]:
    """(kernel hash, rootfs hash) the current recipe asks for."""
    return hashing.kernel_hash(KERNEL), hashing.image_hash(_recipe(vm_type))


def _kernel_complete(path: Path) -> bool:
    return all((path / name).is_file() for name in ("vmlinuz", "initrd.img", "manifest.json"))


def _image_complete(path: Path) -> bool:
    return all((path / name).is_file() for name in ("rootfs.ext4", "manifest.json"))


def resolve(settings: Settings, vm_type: str) -> ImageRef | None:
    """The built image for the current recipe of ``vm_type``, or None if it is not built."""
    khash, ihash = current_hashes(vm_type)
    kdir, idir = kernel_dir(settings, khash), image_dir(settings, vm_type, ihash)
    if not (_kernel_complete(kdir) and _image_complete(idir)):
        return None
    return ImageRef(
        vm_type=vm_type,
        kernel=kdir / "vmlinuz",
        initrd=kdir / "initrd.img",
        rootfs=idir / "rootfs.ext4",
        recipe_hash=ihash,
    )


def require(settings: Settings, vm_type: str) -> ImageRef:
    """Like :func:`resolve` but raises ``ImageMissing`` naming the build command."""
    ref = resolve(settings, vm_type)
    if ref is None:
        raise ImageMissing(
            f"The {vm_type} guest image is not built for the current recipe; run 'remotecli images build {vm_type}'."
        )
    return ref


# --------------------------------------------------------------------------------------------
# Helpers


def _disk_usage(path: Path) -> int:
    """Bytes allocated on disk (sparse files count what they use)."""
    if path.is_file():
        return path.stat().st_blocks * 512
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, name)).st_blocks * 512
    return total


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


@contextlib.contextmanager
def _build_lock(images_dir: Path) -> Iterator[None]:
    images_dir.mkdir(parents=True, exist_ok=True)
    with open(images_dir / ".lock", "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _tmp_root(settings: Settings) -> Path:
    return settings.images_dir / ".tmp"


def _clean_tmp(settings: Settings) -> None:
    """Remove leftovers of interrupted builds (called with the build lock held)."""
    tmp = _tmp_root(settings)
    if tmp.is_dir():
        for entry in tmp.iterdir():
            shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() else entry.unlink(missing_ok=True)


def _new_tmp(settings: Settings, name: str) -> Path:
    tmp = _tmp_root(settings)
    tmp.mkdir(parents=True, exist_ok=True)
    path = tmp / f"{name}-{uuid.uuid4().hex[:8]}"
    path.mkdir()
    return path


def _publish(tmp: Path, final: Path) -> None:
    """Atomically move a finished build into place (replacing an older build of the same name)."""
    final.parent.mkdir(parents=True, exist_ok=True)
    old: Path | None = None
    if final.exists():
        old = tmp.parent / f"old-{final.name}-{uuid.uuid4().hex[:8]}"
        os.rename(final, old)
    os.rename(tmp, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _log_tail(log: Path, lines: int = 30) -> str:
    try:
        text = log.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def _run(
    argv: list[str],
    log: Path,
    *,
    what: str,
    on_line: Callable[[str], None] | None = None,
    env: dict[str, str] | None = None,
) -> None:
    """Run a build command, appending its output to ``log``; raise ImageBuildFailed on failure."""
    full_env = dict(os.environ)
    full_env.setdefault("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
    if "/usr/sbin" not in full_env["PATH"].split(":"):
        full_env["PATH"] += ":/usr/sbin:/sbin"
    full_env["LC_ALL"] = "C.UTF-8"
    if env:
        full_env.update(env)
    with log.open("a") as out:
        out.write(f"$ {' '.join(argv)}\n")
        out.flush()
        process = subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=full_env
        )
        assert process.stdout is not None
        for raw in process.stdout:
            line = raw.decode("utf-8", errors="replace")
            out.write(line)
            if on_line is not None:
                on_line(line.rstrip("\n"))
        code = process.wait()
        out.write(f"[exit {code}]\n")
    if code != 0:
        raise ImageBuildFailed(
            f"{what} failed (exit {code}); see the build log {log}.",
            log_detail=_log_tail(log),
        )


# mmdebstrap's "I: ..." lines -> fraction of the mmdebstrap stage done.
_MMDEBSTRAP_STEPS: tuple[tuple[str, float], ...] = (
    ("chroot architecture", 0.02),
    ("downloading packages", 0.1),
    ("extracting archives", 0.35),
    ("installing essential packages", 0.45),
    ("installing remaining packages", 0.55),
    ("running --customize-hook", 0.9),
    ("cleaning package lists", 0.95),
    ("success", 1.0),
)


def _mmdebstrap_progress(
    target: str, report: Callable[[ProgressEvent], None], start: float, end: float
) -> Callable[[str], None]:
    def on_line(line: str) -> None:
        if not line.startswith("I: "):
            return
        text = line[3:].strip()
        for needle, fraction in _MMDEBSTRAP_STEPS:
            if needle in text:
                report(ProgressEvent(target, "mmdebstrap", text, start + (end - start) * fraction))
                return

    return on_line


def _check_root() -> None:
    if os.geteuid() != 0:
        raise ImageBuildFailed(
            "Building guest images needs root (mmdebstrap creates device nodes and root-owned files); "
            "run 'remotecli images build' as root."
        )


def _dpkg_versions(root: Path, names: tuple[str, ...]) -> dict[str, str]:
    """Installed versions of the given packages, from the tree's dpkg status file."""
    try:
        text = (root / "var" / "lib" / "dpkg" / "status").read_text(errors="replace")
    except OSError:
        return {}
    wanted = set(names)
    versions: dict[str, str] = {}
    for block in text.split("\n\n"):
        fields: dict[str, str] = {}
        for line in block.splitlines():
            if ":" in line and not line.startswith(" "):
                key, _, value = line.partition(":")
                fields[key] = value.strip()
        name = fields.get("Package")
        if name in wanted and fields.get("Status", "").endswith(" installed"):
            versions[name] = fields.get("Version", "")
    return versions


def _npm_versions(root: Path, packages: tuple[str, ...]) -> dict[str, str]:
    versions: dict[str, str] = {}
    for spec in packages:
        name = spec if not spec[1:].count("@") else spec[: spec.rindex("@")]
        manifest = read_json_object(root / "usr" / "local" / "lib" / "node_modules" / name / "package.json")
        if manifest.get("version"):
            versions[name] = str(manifest["version"])
    return versions


# --------------------------------------------------------------------------------------------
# Stages


def _build_kernel(settings: Settings, recipe: KernelRecipe, digest: str, report: ProgressCallback) -> Path:
    mmdebstrap = require_tool("mmdebstrap")
    tmp = _new_tmp(settings, f"kernel-{digest}")
    log = tmp / "build.log"
    scratch = tmp / "extract"
    report(ProgressEvent("kernel", "download", "downloading the Debian cloud kernel and busybox", 5.0))
    _run(
        [
            mmdebstrap,
            "--variant=extract",
            "--mode=root",
            "--format=directory",
            f"--include={','.join(recipe.packages)}",
            '--aptopt=Acquire::Retries "3";',
            recipe.suite,
            str(scratch),
            recipe.mirror,
        ],
        log,
        what="Downloading the kernel (mmdebstrap --variant=extract)",
        on_line=_mmdebstrap_progress("kernel", report, 5.0, 70.0),
    )
    report(ProgressEvent("kernel", "initramfs", "packing the initramfs", 75.0))
    kernel = find_kernel(scratch)
    modules = resolve_modules(kernel.modules_dir, recipe.modules)
    busybox = next((p for p in (scratch / "usr/bin/busybox", scratch / "bin/busybox") if p.is_file()), None)
    if busybox is None:
        raise ImageBuildFailed("busybox-static was not found in the extracted packages.", log_detail=str(scratch))
    init_script = (hashing.FILES_DIR / recipe.init_file).read_bytes()
    shutil.copyfile(kernel.vmlinuz, tmp / "vmlinuz")
    (tmp / "initrd.img").write_bytes(build_initramfs(busybox.read_bytes(), init_script, modules))
    shutil.rmtree(scratch)
    return tmp


def _kernel_manifest(recipe: KernelRecipe, digest: str, tmp: Path, seconds: float) -> dict[str, Any]:
    return {
        "kind": "kernel",
        "hash": digest,
        "recipe": recipe.as_dict(),
        "built_at": _now(),
        "build_seconds": round(seconds, 1),
        "sizes": {name: (tmp / name).stat().st_size for name in ("vmlinuz", "initrd.img")},
    }


def _build_tree(settings: Settings, recipe: ImageRecipe, digest: str, report: ProgressCallback, npm_end: float) -> Path:
    """The slow stage: mmdebstrap the package recipe, then npm install on the host into the tree."""
    mmdebstrap = require_tool("mmdebstrap")
    npm = require_tool("npm") if recipe.npm_packages else None
    target = recipe.vm_type
    tmp = _new_tmp(settings, f"tree-{target}-{digest}")
    log = tmp / "build.log"
    root = tmp / "root"
    hooks: list[str] = []
    for user in recipe.users:
        hooks.append(
            f'chroot "$1" useradd --create-home --user-group --uid {user.uid} '
            f"--home-dir {user.home} --shell {user.shell} {user.name}"
        )
        for group in user.groups:
            hooks.append(f'chroot "$1" usermod -aG {group} {user.name}')
    hooks.extend(recipe.customize)
    argv = [
        mmdebstrap,
        f"--variant={recipe.variant}",
        "--mode=root",
        "--format=directory",
        f"--include={','.join(recipe.packages)}",
        '--aptopt=Acquire::Retries "3";',
        "--dpkgopt=path-exclude=/usr/share/man/*",
        "--dpkgopt=path-exclude=/usr/share/info/*",
        "--dpkgopt=path-exclude=/usr/share/doc/*",
        "--dpkgopt=path-include=/usr/share/doc/*/copyright",
        *[f"--customize-hook={hook}" for hook in hooks],
        recipe.suite,
        str(root),
        recipe.mirror,
    ]
    mm_end = npm_end * 0.8 if npm else npm_end
    report(ProgressEvent(target, "mmdebstrap", f"installing Debian {recipe.suite} packages", 1.0))
    _run(
        argv,
        log,
        what=f"Installing the {target} packages (mmdebstrap)",
        on_line=_mmdebstrap_progress(target, report, 1.0, mm_end),
    )
    if npm:
        report(ProgressEvent(target, "npm", f"npm install {' '.join(recipe.npm_packages)}", mm_end))
        _run(
            [
                npm,
                "install",
                "--global",
                f"--prefix={root / 'usr' / 'local'}",
                f"--cache={settings.images_dir / 'cache' / 'npm'}",
                "--no-audit",
                "--no-fund",
                "--no-update-notifier",
                "--loglevel=warn",
                *recipe.npm_packages,
            ],
            log,
            what=f"Installing the npm packages of the {target} image",
            env={"npm_config_update_notifier": "false"},
        )
    versions = _dpkg_versions(root, recipe.packages)
    versions.update(_npm_versions(root, recipe.npm_packages))
    _write_json(
        tmp / "tree.json",
        {
            "kind": "tree",
            "hash": digest,
            "recipe": recipe.tree_dict(),
            "built_at": _now(),
            "versions": versions,
        },
    )
    return tmp


def _install_final_files(root: Path, recipe: ImageRecipe) -> None:
    """Write the files the final stage owns into the tree (replacing an earlier final stage's)."""
    init_dst = root / "sbin" / "remotecli-init"
    init_dst.unlink(missing_ok=True)
    shutil.copyfile(hashing.FILES_DIR / recipe.init_file, init_dst)
    os.chmod(init_dst, 0o755)

    agent_dst = root / "opt" / "remotecli" / "remotecli_guest"
    if agent_dst.exists():
        shutil.rmtree(agent_dst)
    agent_dst.mkdir(parents=True)
    os.chmod(agent_dst.parent, 0o755)
    for src in hashing.agent_source_files():
        dst = agent_dst / src.relative_to(hashing.AGENT_SOURCE_DIR)
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dst)
        os.chmod(dst, 0o644)
    for directory in [agent_dst, *[p for p in agent_dst.rglob("*") if p.is_dir()]]:
        os.chmod(directory, 0o755)

    etc = root / "etc"
    for name, content in (
        ("hostname", f"{recipe.default_hostname}\n"),
        (
            "hosts",
            f"127.0.0.1\tlocalhost\n127.0.1.1\t{recipe.default_hostname}\n::1\tlocalhost ip6-localhost\n",
        ),
        ("resolv.conf", "nameserver 10.0.2.3\n"),
    ):
        path = etc / name
        if path.is_symlink() or path.exists():
            path.unlink()
        path.write_text(content)
        os.chmod(path, 0o644)


def _build_rootfs(
    settings: Settings, recipe: ImageRecipe, digest: str, tree: Path, report: ProgressCallback, start: float
) -> Path:
    mkfs = require_tool("mkfs.ext4")
    target = recipe.vm_type
    tmp = _new_tmp(settings, f"{target}-{digest}")
    log = tmp / "build.log"
    root = tree / "root"
    report(ProgressEvent(target, "files", "installing the init script and guest agent", start))
    _install_final_files(root, recipe)
    image = tmp / "rootfs.ext4"
    with image.open("wb") as handle:
        handle.truncate(recipe.disk_size_mib * 1024 * 1024)
    report(ProgressEvent(target, "mkfs", "writing rootfs.ext4 (mkfs.ext4 -d)", start + (100 - start) * 0.1))
    _run(
        [
            mkfs,
            "-q",
            "-F",
            "-t",
            "ext4",
            "-L",
            f"rc-{target}"[:16],
            "-U",
            str(uuid.UUID(hex=(digest * 2)[:32])),
            "-m",
            "1",
            "-E",
            "lazy_itable_init=0,lazy_journal_init=0",
            "-d",
            str(root),
            str(image),
        ],
        log,
        what=f"Writing the {target} root filesystem (mkfs.ext4 -d)",
    )
    os.chmod(image, 0o444)  # shared, read-only backing file of every VM's overlay
    return tmp


# --------------------------------------------------------------------------------------------
# Public: build, status, prune


def _noop(_event: ProgressEvent) -> None:
    return None


def _ensure_kernel(settings: Settings, report: ProgressCallback, force: bool) -> BuildResult:
    digest = hashing.kernel_hash(KERNEL)
    final = kernel_dir(settings, digest)
    if _kernel_complete(final) and not force:
        message = f"kernel up to date (hash {digest})"
        report(ProgressEvent("kernel", "up_to_date", message, 100.0))
        return BuildResult("kernel", "up_to_date", digest, 0.0, _disk_usage(final), final, message)
    started = time.monotonic()
    tmp = _build_kernel(settings, KERNEL, digest, report)
    seconds = time.monotonic() - started
    _write_json(tmp / "manifest.json", _kernel_manifest(KERNEL, digest, tmp, seconds))
    _publish(tmp, final)
    size = _disk_usage(final)
    message = f"kernel built in {seconds:.1f}s (hash {digest}, {size / 1e6:.1f} MB)"
    report(ProgressEvent("kernel", "done", message, 100.0))
    return BuildResult("kernel", "built", digest, seconds, size, final, message)


def _ensure_image(settings: Settings, vm_type: str, report: ProgressCallback, force: bool) -> BuildResult:
    recipe = _recipe(vm_type)
    digest = hashing.image_hash(recipe)
    final = image_dir(settings, vm_type, digest)
    if _image_complete(final) and not force:
        message = f"{vm_type} image up to date (hash {digest})"
        report(ProgressEvent(vm_type, "up_to_date", message, 100.0))
        return BuildResult(vm_type, "up_to_date", digest, 0.0, _disk_usage(final), final, message)
    started = time.monotonic()
    require_tool("mkfs.ext4")
    tdigest = hashing.tree_hash(recipe)
    tree = tree_dir(settings, vm_type, tdigest)
    tree_reused = (tree / "tree.json").is_file() and not force
    if tree_reused:
        report(ProgressEvent(vm_type, "tree", f"package tree cached (hash {tdigest})", 80.0))
    else:
        tmp_tree = _build_tree(settings, recipe, tdigest, report, npm_end=80.0)
        _publish(tmp_tree, tree)
    tmp = _build_rootfs(settings, recipe, digest, tree, report, 80.0)
    seconds = time.monotonic() - started
    tree_info = read_json_object(tree / "tree.json")
    image = tmp / "rootfs.ext4"
    constants: dict[str, Any] = {}
    if recipe.npm_packages:
        report(ProgressEvent(vm_type, "files", "reading the CLIs' OAuth constants", 95.0))
        node_modules = tree / "root" / "usr" / "local" / "lib" / "node_modules"
        constants = {name: c.as_dict() for name, c in cli_constants.extract_all(node_modules).items()}
    manifest = {
        "kind": "rootfs",
        "vm_type": vm_type,
        "hash": digest,
        "tree_hash": tdigest,
        "tree_reused": tree_reused,
        "agent_hash": hashing.agent_digest(),
        "recipe": recipe.as_dict(),
        "built_at": _now(),
        "build_seconds": round(seconds, 1),
        "size_bytes": image.stat().st_size,
        "allocated_bytes": _disk_usage(image),
        "versions": tree_info.get("versions", {}),
    }
    if constants:
        # What the installed CLIs sign in with (compared with the provider profiles by
        # services/provider_drift.py: images build, doctor, up, GET /api/v1/providers).
        manifest["cli_constants"] = constants
        manifest["cli_constants_extractor"] = cli_constants.EXTRACTOR_VERSION
    _write_json(tmp / "manifest.json", manifest)
    _publish(tmp, final)
    size = _disk_usage(final)
    how = "from the cached package tree" if tree_reused else "from scratch"
    message = f"{vm_type} image built {how} in {seconds:.1f}s (hash {digest}, {size / 1e6:.0f} MB on disk)"
    report(ProgressEvent(vm_type, "done", message, 100.0))
    return BuildResult(vm_type, "built", digest, seconds, size, final, message)


def build(
    settings: Settings,
    vm_types: list[str],
    progress: ProgressCallback | None = None,
    force: bool = False,
) -> list[BuildResult]:
    """Build the kernel and the images of ``vm_types`` unless already built for the current recipe.

    Returns one result for the kernel, then one per VM type. ``force`` rebuilds everything asked
    for, including the cached package trees (e.g. to pick up new npm releases).
    """
    report = progress or _noop
    for vm_type in vm_types:
        _recipe(vm_type)
    needs_work = force or resolve_any_missing(settings, vm_types)
    results: list[BuildResult] = []
    with _build_lock(settings.images_dir):
        if needs_work:
            _check_root()
            _clean_tmp(settings)
        try:
            results.append(_ensure_kernel(settings, report, force))
            for vm_type in dict.fromkeys(vm_types):
                results.append(_ensure_image(settings, vm_type, report, force))
        finally:
            _clean_tmp(settings)
    return results


def resolve_any_missing(settings: Settings, vm_types: list[str]) -> bool:
    return any(resolve(settings, vm_type) is None for vm_type in vm_types) or not _kernel_complete(
        kernel_dir(settings, hashing.kernel_hash(KERNEL))
    )


def _builds_on_disk(settings: Settings, prefix: str) -> list[Path]:
    if not settings.images_dir.is_dir():
        return []
    return sorted(p for p in settings.images_dir.glob(f"{prefix}-*") if p.is_dir() and len(p.name) == len(prefix) + 17)


def status(settings: Settings) -> list[ImageStatus]:
    """One entry for the kernel and one per VM type, for ``remotecli doctor`` / ``images status``."""
    entries: list[ImageStatus] = []
    khash = hashing.kernel_hash(KERNEL)
    kdir = kernel_dir(settings, khash)
    kmanifest = read_json_object(kdir / "manifest.json")
    entries.append(
        ImageStatus(
            target="kernel",
            hash=khash,
            built=_kernel_complete(kdir),
            path=kdir,
            size_bytes=_disk_usage(kdir) if kdir.is_dir() else None,
            built_at=kmanifest.get("built_at"),
            other_builds=tuple(p.name[7:] for p in _builds_on_disk(settings, "kernel") if p != kdir),
        )
    )
    for vm_type, recipe in RECIPES.items():
        ihash = hashing.image_hash(recipe)
        idir = image_dir(settings, vm_type, ihash)
        manifest = read_json_object(idir / "manifest.json")
        entries.append(
            ImageStatus(
                target=vm_type,
                hash=ihash,
                built=_image_complete(idir),
                path=idir,
                size_bytes=_disk_usage(idir) if idir.is_dir() else None,
                built_at=manifest.get("built_at"),
                versions={str(k): str(v) for k, v in manifest.get("versions", {}).items()},
                other_builds=tuple(p.name[len(vm_type) + 1 :] for p in _builds_on_disk(settings, vm_type) if p != idir),
            )
        )
    return entries


def installed_cli_constants(settings: Settings) -> dict[str, cli_constants.CliConstants] | None:
    """The OAuth constants recorded in the current ``cli`` image's manifest, per provider profile
    name; ``None`` when that image is not built or was built before constants were recorded."""
    idir = image_dir(settings, "cli", hashing.image_hash(_recipe("cli")))
    recorded = read_json_object(idir / "manifest.json").get("cli_constants")
    if not isinstance(recorded, dict) or not recorded:
        return None
    return {str(k): cli_constants.CliConstants.from_dict(v) for k, v in recorded.items() if isinstance(v, dict)}


def _paths_in_use(settings: Settings) -> set[Path]:
    """Image files referenced by VM directories' vm.json (the QEMU driver's record)."""
    used: set[Path] = set()
    if not settings.vms_dir.is_dir():
        return used
    for record in settings.vms_dir.glob("*/vm.json"):
        image = read_json_object(record).get("image", {})
        if isinstance(image, dict):
            for value in image.values():
                if isinstance(value, str) and value.startswith("/"):
                    used.add(Path(value).parent)
    return used


def prune(settings: Settings, keep_in_use: bool = True) -> list[Path]:
    """Remove builds and cached trees the current recipes do not use. Returns what was removed.

    With ``keep_in_use`` (default) an image a VM directory still references is kept. (The QEMU
    driver hard-links the rootfs into each VM directory where it can, so removing it is safe for
    those VMs in any case.)
    """
    removed: list[Path] = []
    keep: set[Path] = {kernel_dir(settings, hashing.kernel_hash(KERNEL))}
    for vm_type, recipe in RECIPES.items():
        keep.add(image_dir(settings, vm_type, hashing.image_hash(recipe)))
        keep.add(tree_dir(settings, vm_type, hashing.tree_hash(recipe)))
    if keep_in_use:
        keep |= _paths_in_use(settings)
    with _build_lock(settings.images_dir):
        _clean_tmp(settings)
        candidates = _builds_on_disk(settings, "kernel")
        for vm_type in RECIPES:
            candidates += _builds_on_disk(settings, vm_type)
        cache = settings.images_dir / "cache"
        if cache.is_dir():
            candidates += sorted(p for p in cache.glob("tree-*") if p.is_dir())
        for path in candidates:
            if path not in keep:
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path)
    return removed
