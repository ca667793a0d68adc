"""A real 3-member Incus cluster on this one machine, for the ``cluster`` tests and by hand.

Layout (docs/incus-test-cluster.md says more)::

    root namespace:  unreachable route 10.231.0.0/24  (the guard: nothing here can reach the test net)
    netns rcic-sw:   bridge br0 (the "switch"), one port per member and one for the controller
    netns rcic-m1..3 eth0 10.231.0.11..13/24, no default route; incusd in a mount namespace whose
                     root is an overlay over a cached Debian trixie tree (upper dir per member)
    netns rcic-ctl:  eth0 10.231.0.2/24, where Incus clients (the test controller) run

Every Incus daemon and client runs inside those namespaces; the namespaces have no route out of
10.231.0.0/24, and the root namespace has an ``unreachable`` route for it, installed and checked
before the first command (:func:`ensure_guard_routes`).

CLI (as root; scripts/incus-cluster.sh wraps it): ``python -m tests.support.incus_cluster`` with
``up``, ``down``, ``status``, ``leftovers``, ``tree``, ``ctl-incus ARGS...`` (the incus CLI as the
controller, from the controller netns), ``ctl-exec CMD...``, ``member-exec M CMD...``, and the faults
``cut M``, ``restore-link M``, ``kill M``, ``start M``, ``evacuate M``, ``restore M``.

Why one module of about 1,100 lines: its parts (guard, tree, network, member namespaces, cluster,
controller access, image, faults, teardown) share the names, paths and cgroup/namespace bookkeeping
that teardown must undo exactly; split over files, that one contract (what ``up`` makes, ``down``
removes) would be harder to check. Sections are marked with ``# ---`` rules.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from remotecli.images.recipes import DEBIAN_MIRROR

REPO = Path(__file__).resolve().parents[2]
PREFIX = os.environ.get("REMOTECLI_INCUS_PREFIX", "rcic")
BASE_DIR = Path(os.environ.get("REMOTECLI_INCUS_CLUSTER_DIR", str(REPO / ".data" / "incus-cluster")))
RUN_DIR = BASE_DIR / "run"
# The member tree is cached per machine (not per clone), so CI's fresh clone on this machine reuses it.
TREE_CACHE = Path(os.environ.get("REMOTECLI_INCUS_TREE_CACHE", "/var/cache/remotecli/incus-cluster"))

SUBNET = "10.231.0.0/24"
GUARD_ROUTES_V4 = (SUBNET,)
SWITCH_NS = f"{PREFIX}-sw"
CTL_NS = f"{PREFIX}-ctl"
CTL_ADDRESS = "10.231.0.2"
MEMBERS = ("m1", "m2", "m3")
MEMBER_ADDRESS = {"m1": "10.231.0.11", "m2": "10.231.0.12", "m3": "10.231.0.13"}
HTTPS_PORT = 8443
POOL = "local"
PROJECT = "remotecli"
IMAGE_ALIAS = "rc-busybox"
# The guest images (remotecli images build), bind-mounted read-only at MEMBER_IMAGES_DIR in every
# member, so the driver's containers get them as a read-only disk (incus_member_images_dir).
TEST_DATA_DIR = Path(os.environ.get("REMOTECLI_TEST_DATA_DIR") or REPO / ".data" / "test-images")
IMAGES_DIR = TEST_DATA_DIR / "images"
MEMBER_IMAGES_DIR = "/host/images"
OFFLINE_THRESHOLD_S = 12  # Incus' default is 20; the tests wait for OFFLINE, so shorter is cheaper

# The member tree. Changing anything here changes the recipe hash, so a new tree is built.
TREE_SUITE = "trixie"
TREE_MIRROR = os.environ.get("REMOTECLI_DEBIAN_MIRROR", DEBIAN_MIRROR)  # the guest images' mirror
TREE_PACKAGES = ("incus", "incus-client", "iproute2", "procps", "ca-certificates", "xz-utils",
                 "squashfs-tools", "kmod", "tini")
TREE_RECIPE = {"version": 1, "suite": TREE_SUITE, "variant": "apt", "packages": TREE_PACKAGES}

INCUSD = "/usr/libexec/incus/incusd"
INCUSD_FLAGS = tuple(os.environ.get("REMOTECLI_INCUSD_FLAGS", "").split())
MEMBER_ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/libexec/incus:/usr/sbin:/usr/bin:/sbin:/bin",
              "HOME": "/root", "LANG": "C.UTF-8"}


class ClusterError(RuntimeError):
    """The test cluster could not be set up, checked or driven."""


# --------------------------------------------------------------------------- small helpers

def _run(argv: Sequence[str], *, check: bool = True, timeout: float = 120, input: str | None = None,
         env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, input=input,
                            env=env)
    if check and result.returncode != 0:
        raise ClusterError(f"{' '.join(argv[:6])}... exited {result.returncode}: "
                           f"{(result.stderr or result.stdout).strip()[-800:]}")
    return result


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return _run(["ip", *args], check=check)


def _netns_path(ns: str) -> str:
    return f"/run/netns/{ns}"


def member_ns(member: str) -> str:
    return f"{PREFIX}-{member}"


def recipe_hash() -> str:
    return hashlib.sha256(json.dumps(TREE_RECIPE, sort_keys=True).encode()).hexdigest()[:16]


def tree_dir() -> Path:
    return TREE_CACHE / f"tree-{recipe_hash()}" / "root"


# --------------------------------------------------------------------------- the guard

def missing_guard_routes() -> list[str]:
    """The guard routes missing in the root namespace (empty: all there)."""
    missing = []
    for prefix in GUARD_ROUTES_V4:
        out = _ip("-4", "route", "show", "table", "main", "exact", prefix).stdout
        if "unreachable" not in out:
            missing.append(prefix)
    return missing


def ensure_guard_routes() -> None:
    """Install ``unreachable`` routes for the test subnet in the root namespace, then check them.

    With them, a client or daemon that ran in the root namespace by mistake gets "network is
    unreachable" for a member address instead of sending it out through the default route."""
    for prefix in GUARD_ROUTES_V4:
        _ip("-4", "route", "replace", "unreachable", prefix)
    missing = missing_guard_routes()
    if missing:
        raise ClusterError(f"guard routes missing in the root namespace: {missing}")


def require_guard() -> None:
    """Refuse to run a cluster command while a guard route is missing."""
    missing = missing_guard_routes()
    if missing:
        raise ClusterError(f"guard routes missing in the root namespace: {missing} (run 'up')")


def remove_guard_routes() -> None:
    """Remove the guard routes, unless another test cluster (another prefix) still runs."""
    others = [p.name for p in Path("/run/netns").glob("rcic*-sw") if p.name != SWITCH_NS] \
        if Path("/run/netns").exists() else []
    if others:
        return
    for prefix in GUARD_ROUTES_V4:
        _ip("-4", "route", "del", "unreachable", prefix, check=False)


# --------------------------------------------------------------------------- the tree

def build_tree(log: Path | None = None) -> Path:
    """The cached Debian trixie tree with Incus (built with mmdebstrap once per recipe hash)."""
    root = tree_dir()
    if (root / "usr" / "libexec" / "incus" / "incusd").exists():
        return root
    if shutil.which("mmdebstrap") is None:
        raise ClusterError("mmdebstrap is not installed (scripts/install.sh installs it)")
    TREE_CACHE.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix="tree-build-", dir=TREE_CACHE))
    started = time.monotonic()
    argv = ["mmdebstrap", f"--variant={TREE_RECIPE['variant']}", "--include=" + ",".join(TREE_PACKAGES),
            TREE_SUITE, str(staging / "root"), TREE_MIRROR]
    log = log or (TREE_CACHE / "tree-build.log")
    log.write_text("")
    for _attempt in range(2):  # once more after a failed download
        shutil.rmtree(staging / "root", ignore_errors=True)
        with open(log, "a") as out:
            result = subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT, timeout=1200)
        if result.returncode == 0:
            break
    if result.returncode != 0:
        shutil.rmtree(staging, ignore_errors=True)
        raise ClusterError(f"mmdebstrap failed ({result.returncode}); see {log}")
    (staging / "recipe.json").write_text(json.dumps(TREE_RECIPE, sort_keys=True, indent=1))
    (staging / "build-seconds").write_text(f"{time.monotonic() - started:.0f}\n")
    root.parent.parent.mkdir(parents=True, exist_ok=True)
    if root.parent.exists():
        shutil.rmtree(root.parent)
    staging.rename(root.parent)
    prune_old_trees()
    return root


def prune_old_trees() -> None:
    keep = tree_dir().parent
    for entry in TREE_CACHE.glob("tree-*"):
        if entry != keep and entry.is_dir() and not entry.name.startswith("tree-build-"):
            shutil.rmtree(entry, ignore_errors=True)


# --------------------------------------------------------------------------- network

def _netns_exists(ns: str) -> bool:
    return Path(_netns_path(ns)).exists()


def setup_network() -> None:
    """The switch namespace with its bridge, a namespace per member and one for the controller."""
    for ns in (SWITCH_NS, CTL_NS, *(member_ns(m) for m in MEMBERS)):
        if not _netns_exists(ns):
            _ip("netns", "add", ns)
        _ip("-n", ns, "link", "set", "lo", "up")
        # IPv6 off everywhere in the test net: nothing to route, nothing to leak.
        _run(["ip", "netns", "exec", ns, "sysctl", "-q", "-w", "net.ipv6.conf.all.disable_ipv6=1",
              "net.ipv6.conf.default.disable_ipv6=1"])
    if _ip("-n", SWITCH_NS, "link", "show", "br0", check=False).returncode != 0:
        _ip("-n", SWITCH_NS, "link", "add", "br0", "type", "bridge")
    _ip("-n", SWITCH_NS, "link", "set", "br0", "up")
    ends = [(member_ns(m), m, MEMBER_ADDRESS[m]) for m in MEMBERS] + [(CTL_NS, "ctl", CTL_ADDRESS)]
    for ns, port, address in ends:
        if _ip("-n", SWITCH_NS, "link", "show", port, check=False).returncode != 0:
            _ip("link", "add", "rcic-tmp-a", "type", "veth", "peer", "name", "rcic-tmp-b")
            _ip("link", "set", "rcic-tmp-a", "netns", ns)
            _ip("-n", ns, "link", "set", "rcic-tmp-a", "name", "eth0")
            _ip("link", "set", "rcic-tmp-b", "netns", SWITCH_NS)
            _ip("-n", SWITCH_NS, "link", "set", "rcic-tmp-b", "name", port)
            _ip("-n", SWITCH_NS, "link", "set", port, "master", "br0")
            _ip("-n", ns, "addr", "add", f"{address}/24", "dev", "eth0")
        _ip("-n", SWITCH_NS, "link", "set", port, "up")
        _ip("-n", ns, "link", "set", "eth0", "up")


def cut_link(member: str) -> None:
    """Cut a member off the switch (its bridge port goes down); :func:`restore_link` undoes it."""
    _ip("-n", SWITCH_NS, "link", "set", member, "down")


def restore_link(member: str) -> None:
    _ip("-n", SWITCH_NS, "link", "set", member, "up")


# --------------------------------------------------------------------------- members

def member_dir(member: str) -> Path:
    return RUN_DIR / member


def _mount_ns_file(member: str) -> Path:
    return RUN_DIR / "ns" / member


def _cgroup_ns_file(member: str) -> Path:
    return RUN_DIR / "ns" / f"{member}.cgroup"


def _pid_ns_file(member: str) -> Path:
    return RUN_DIR / "ns" / f"{member}.pid"


def _ns_files(member: str) -> tuple[Path, ...]:
    return (_mount_ns_file(member), _cgroup_ns_file(member), _pid_ns_file(member))


def _ensure_ns_dir() -> None:
    ns_dir = RUN_DIR / "ns"
    ns_dir.mkdir(parents=True, exist_ok=True)
    mounts = Path("/proc/self/mountinfo").read_text()
    if f" {ns_dir} " not in mounts:
        _run(["mount", "--bind", str(ns_dir), str(ns_dir)])
        _run(["mount", "--make-private", str(ns_dir)])


def _cgroup_mounts(merged: Path) -> list[str]:
    """Shell lines mounting the host's cgroup layout (v1/hybrid, or plain v2) in a member's root."""
    top = merged / "sys/fs/cgroup"
    hierarchies = _hierarchies()
    if any(h.mount == Path("/sys/fs/cgroup") for h in hierarchies):  # cgroup v2 only (not tested here)
        return [f"mount -t cgroup2 cgroup2 {top}"]
    return [f"mount -t tmpfs -o mode=755 cgroup {top}"] + [
        f"mkdir -p {top}/{h.mount.name} && mount -t {h.fstype} {'-o ' + h.options if h.options else ''} "
        f"{h.fstype} {top}/{h.mount.name}" for h in hierarchies]


def _member_setup_script(member: str, tree: Path) -> str:
    d = member_dir(member)
    merged = d / "merged"
    return "\n".join([
        "set -e",
        f"mount -t overlay overlay -o lowerdir={tree},upperdir={d / 'upper'},workdir={d / 'work'} {merged}",
        f"mount -t proc proc {merged}/proc",
        f"mount -t sysfs sysfs {merged}/sys",
        # The member's own cgroups, seen through its cgroup namespace as the root of each hierarchy,
        # so lxc's cgroups for its containers land under them (and under our sandbox's limits).
        *_cgroup_mounts(merged),
        f"mount --rbind /dev {merged}/dev",
        f"mount -t tmpfs -o mode=755 tmpfs {merged}/run",
        f"mount -t tmpfs -o mode=1777 tmpfs {merged}/tmp",
        # The host's QEMU 7.2 with its libraries and firmware, read-only (trixie's QEMU 10
        # microvm hung in firmware under TCG): run it as /host/usr/local/bin/qemu-host (below).
        f"mkdir -p {merged}/host/usr",
        f"mount --bind /usr {merged}/host/usr",
        f"mount -o remount,bind,ro {merged}/host/usr",
        # The guest images, read-only, for the driver's containers (its incus_member_images_dir).
        f"mkdir -p {merged}{MEMBER_IMAGES_DIR}",
        f"mount --bind {IMAGES_DIR} {merged}{MEMBER_IMAGES_DIR}",
        f"mount -o remount,bind,ro {merged}{MEMBER_IMAGES_DIR}",
        # A real root (pivot_root, not chroot): the kernel refuses new user namespaces (unprivileged
        # containers) to a chrooted process. nsenter --mount lands in this root afterwards.
        f"mkdir -p {merged}/.oldroot",
        f"cd {merged}",
        "pivot_root . .oldroot",
        "cd /",
        "umount -l /.oldroot",
        "rmdir /.oldroot",
        ": > /etc/resolv.conf",  # no name server: nothing to ask outside the test net
        "touch /run/rcic-ready",
        # PID 1 of the member's pid namespace: reaps orphans and keeps the namespaces alive while
        # incusd is killed and restarted. lxc takes /proc/1/cgroup as its cgroup base.
        "exec /usr/bin/tini -s -- /bin/sleep infinity",
    ])


QEMU_WRAPPER = """#!/bin/sh
# The host's QEMU 7.2 (bookworm), its libraries, modules and firmware mounted read-only at /host/usr.
export QEMU_MODULE_DIR=/host/usr/lib/x86_64-linux-gnu/qemu
exec /host/usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2 --library-path /host/usr/lib/x86_64-linux-gnu \\
  /host/usr/bin/qemu-system-x86_64 -L /host/usr/share/qemu "$@"
"""


@dataclass(frozen=True)
class _Hierarchy:
    mount: Path          # /sys/fs/cgroup/memory
    fstype: str          # cgroup or cgroup2
    options: str         # memory, name=systemd, "" for cgroup2
    own_path: str        # this process's cgroup in it: /process_api/<id>


def _hierarchies() -> list[_Hierarchy]:
    """The host's cgroup hierarchies (v1 controllers and the unified one) and where we are in each."""
    own: dict[str, str] = {}
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        own[",".join(sorted(controllers.split(",")))] = path
    found = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        left, right = line.split(" - ", 1)
        mount_point = left.split()[4]
        fstype, _source, superopts = right.split()[:3]
        if fstype not in ("cgroup", "cgroup2") or not mount_point.startswith("/sys/fs/cgroup"):
            continue
        opts = [o for o in superopts.split(",") if (o not in ("rw", "ro") and "=" not in o) or o.startswith("name=")]
        key = ",".join(sorted(opts)) if fstype == "cgroup" else ""
        if key in own:
            found.append(_Hierarchy(Path(mount_point), fstype, ",".join(opts), own[key]))
    return found


def _cgroup_name(member: str) -> str:
    return f"{PREFIX}-{member}"


def _cgroup_record(member: str) -> Path:
    """Where the member's cgroups are recorded when they are made (one per hierarchy)."""
    return RUN_DIR / "ns" / f"{member}.cgroups"


def _find_cgroup_dirs(member: str, mount: Path | None = None, max_depth: int = 4) -> list[Path]:
    """Directories named like the member's cgroup in the host's hierarchies (or in one), whoever
    made them: where another process's up() put them, or what a lost run left."""
    name = _cgroup_name(member)
    found: list[Path] = []
    for top in [mount] if mount is not None else [h.mount for h in _hierarchies()]:
        level = [top]
        for _ in range(max_depth):
            below: list[Path] = []
            for parent in level:
                with contextlib.suppress(OSError):
                    for entry in os.scandir(parent):
                        if entry.is_dir(follow_symlinks=False):
                            (found if entry.name == name else below).append(Path(entry.path))
            level = below
    return found


def _cgroup_dirs(member: str) -> list[Path]:
    """The member's cgroup in every hierarchy, under the cgroup of the process that made the cluster.

    Recorded when the member's cgroups are made (RUN_DIR/ns/<member>.cgroups), so a process in
    another cgroup (another test job, the CLI) enters, lists and removes the same ones. Without a
    record (a cluster set up before records were kept), existing ones are found by name; a cgroup
    not made yet goes under the caller's own."""
    record = _cgroup_record(member)
    with contextlib.suppress(OSError, ValueError):
        recorded = [Path(p) for p in json.loads(record.read_text())]
        if recorded:
            return recorded
    dirs = []
    for h in _hierarchies():
        existing = _find_cgroup_dirs(member, h.mount)
        dirs.append(existing[0] if existing else h.mount / h.own_path.lstrip("/") / _cgroup_name(member))
    return dirs


def _record_cgroups(member: str, dirs: list[Path]) -> None:
    record = _cgroup_record(member)
    record.parent.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps([str(d) for d in dirs]))


def _pids_cgroup(member: str) -> Path | None:
    for h, cg in zip(_hierarchies(), _cgroup_dirs(member), strict=False):
        if h.options == "pids" or (h.fstype == "cgroup2" and (h.mount / "cgroup.controllers").exists()
                                   and "pids" in (h.mount / "cgroup.controllers").read_text().split()):
            return cg
    return None


def _make_member_cgroups(member: str) -> list[Path]:
    """Make the member's cgroups (once) and record them; returns their ``cgroup.procs`` files."""
    dirs = _cgroup_dirs(member)
    for cg in dirs:
        cg.mkdir(exist_ok=True)
        for knob in ("cpuset.cpus", "cpuset.mems"):  # v1 cpuset starts empty: copy the parent's
            if (cg / knob).exists() and not (cg / knob).read_text().strip():
                (cg / knob).write_text((cg.parent / knob).read_text())
    if not _cgroup_record(member).exists():
        _record_cgroups(member, dirs)
    return [cg / "cgroup.procs" for cg in dirs]


def _enter_cgroups(procs: list[Path]) -> None:
    """preexec_fn: move the new process into the given cgroups (paths computed before the fork)."""
    pid = str(os.getpid())
    for path in procs:
        with open(path, "w") as handle:
            handle.write(pid)


def member_processes(member: str) -> list[int]:
    """Every process of a member (incusd, its containers and their QEMUs), by its pids cgroup."""
    pids: set[int] = set()
    cg = _pids_cgroup(member)
    if cg is not None and cg.exists():
        for procs in cg.rglob("cgroup.procs"):
            try:
                pids.update(int(p) for p in procs.read_text().split())
            except OSError:
                continue
    return sorted(pids)


def _mounted(path: Path) -> bool:
    return f" {path} " in Path("/proc/self/mountinfo").read_text()


def _pids_in_ns(ns_file: Path) -> list[int]:
    """Host pids of the processes in the pid namespace bound at ``ns_file``."""
    try:
        inode = ns_file.stat().st_ino
    except OSError:
        return []
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if os.stat(entry / "ns" / "pid").st_ino == inode:
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def _cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")[:-1]
    except OSError:
        return []


def holder_pid(member: str) -> int | None:
    """The member's PID 1 (tini), as a host pid."""
    for pid in _pids_in_ns(_pid_ns_file(member)):
        argv = _cmdline(pid)
        if argv and argv[0].endswith("tini"):
            return pid
    return None


def setup_member(member: str, tree: Path) -> None:
    """The member's namespaces (mount, cgroup, pid) and root, held by a tini as its PID 1."""
    d = member_dir(member)
    for sub in ("upper", "work", "merged"):
        (d / sub).mkdir(parents=True, exist_ok=True)
    if all(_mounted(f) for f in _ns_files(member)) and holder_pid(member) is not None:
        return
    for ns_file in _ns_files(member):
        if _mounted(ns_file):
            _run(["umount", str(ns_file)], check=False)
        ns_file.touch()
    IMAGES_DIR.mkdir(parents=True, exist_ok=True)  # mounted even before the images are built
    upper = d / "upper"
    (upper / "usr/local/bin").mkdir(parents=True, exist_ok=True)
    wrapper = upper / "usr/local/bin/qemu-host"
    wrapper.write_text(QEMU_WRAPPER)
    wrapper.chmod(0o755)
    (upper / "etc").mkdir(exist_ok=True)
    (upper / "etc/hostname").write_text(member + "\n")
    (upper / "var/log/incus").mkdir(parents=True, exist_ok=True)
    procs = _make_member_cgroups(member)
    argv = ["nsenter", f"--net={_netns_path(member_ns(member))}", "unshare",
            f"--mount={_mount_ns_file(member)}", f"--cgroup={_cgroup_ns_file(member)}",
            f"--pid={_pid_ns_file(member)}", "--fork", "--propagation", "private", "sh", "-c",
            _member_setup_script(member, tree)]
    with open(d / "holder.out", "ab") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True,
                                preexec_fn=lambda: _enter_cgroups(procs))
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ClusterError(f"setting up {member}'s root failed: {(d / 'holder.out').read_text()[-800:]}")
        if all(_mounted(f) for f in _ns_files(member)) and holder_pid(member) is not None:
            return
        time.sleep(0.1)
    raise ClusterError(f"{member}'s root was not ready in 60 s: {(d / 'holder.out').read_text()[-800:]}")


def member_path(member: str, path: str) -> Path:
    """A path inside a member's root, reachable from the root namespace (through its PID 1)."""
    pid = holder_pid(member)
    if pid is None:
        raise ClusterError(f"{member} is not set up")
    return Path(f"/proc/{pid}/root") / path.lstrip("/")


def member_argv(member: str, argv: Sequence[str]) -> list[str]:
    """argv that runs a command inside a member: its netns, mount namespace and root."""
    return ["nsenter", f"--mount={_mount_ns_file(member)}", f"--net={_netns_path(member_ns(member))}",
            f"--cgroup={_cgroup_ns_file(member)}", f"--pid={_pid_ns_file(member)}", "env", "-i",
            *(f"{k}={v}" for k, v in MEMBER_ENV.items()), *argv]


def member_run(member: str, argv: Sequence[str], *, check: bool = True, timeout: float = 120,
               input: str | None = None) -> subprocess.CompletedProcess[str]:
    require_guard()
    return _run(member_argv(member, argv), check=check, timeout=timeout, input=input)


def incus(member: str, *args: str, check: bool = True, timeout: float = 120,
          input: str | None = None) -> subprocess.CompletedProcess[str]:
    """The ``incus`` client as root on a member, over its local unix socket (admin)."""
    return member_run(member, ["incus", *args], check=check, timeout=timeout, input=input)


def incusd_pid(member: str) -> int | None:
    """The host pid of the member's incusd daemon, or None."""
    for pid in _pids_in_ns(_pid_ns_file(member)):
        argv = _cmdline(pid)
        if argv[:1] == [INCUSD] and len(argv) > 1 and argv[1].startswith("--logfile"):
            return pid
    return None


def unix_socket(member: str) -> Path:
    """The member's incusd unix socket, reachable by path from the root namespace (no network).

    A path through /proc/PID/root of the member's PID 1, so it stays while incusd restarts; it
    changes only when the cluster is set up again."""
    pid = holder_pid(member)
    if pid is None:
        raise ClusterError(f"{member} is not set up")
    return Path(f"/proc/{pid}/root/var/lib/incus/unix.socket")


def start_incusd(member: str, timeout: float = 120) -> int:
    """Start (or restart after a kill) incusd in a member and wait until it is ready."""
    if (pid := incusd_pid(member)) is not None:
        return pid
    d = member_dir(member)
    argv = member_argv(member, [INCUSD, "--logfile=/var/log/incus/incusd.log", *INCUSD_FLAGS])
    # The member's recorded cgroups, not the caller's: restarting incusd from another process (a
    # test that killed it, the CLI) puts it back where the cluster's starter put it.
    procs = [cg / "cgroup.procs" for cg in _cgroup_dirs(member)]
    with open(d / "incusd.out", "ab") as out:
        subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                         start_new_session=True, preexec_fn=lambda: _enter_cgroups(procs))
    waited = member_run(member, [INCUSD, "waitready", f"--timeout={int(timeout)}"], check=False,
                        timeout=timeout + 10)
    pid = incusd_pid(member)
    if waited.returncode != 0 or pid is None:
        raise ClusterError(f"incusd on {member} not ready: {waited.stderr.strip()[-400:]}; "
                           f"see {d / 'upper/var/log/incus/incusd.log'}")
    return pid


def _starttime(stat_path: Path) -> str | None:
    try:
        return stat_path.read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def host_pid(member: str, ns_pid: int) -> int | None:
    """The host pid of a process Incus reports by its pid in the member (e.g. an instance's init)."""
    holder = holder_pid(member)
    if holder is None:
        return None
    start = _starttime(Path(f"/proc/{holder}/root/proc/{ns_pid}/stat"))
    if start is None:
        return None
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            status = (entry / "status").read_text()
        except OSError:
            continue
        nspid = next((line.split()[1:] for line in status.splitlines() if line.startswith("NSpid:")), [])
        if len(nspid) > 1 and nspid[1] == str(ns_pid) and _starttime(entry / "stat") == start:
            return int(entry.name)
    return None


def kill_incusd(member: str) -> int:
    """SIGKILL a member's incusd (its containers keep running); :func:`start_incusd` restarts it."""
    pid = incusd_pid(member)
    if pid is None:
        raise ClusterError(f"incusd on {member} is not running")
    os.kill(pid, signal.SIGKILL)
    for _ in range(200):
        if incusd_pid(member) is None:
            break
        time.sleep(0.05)
    return pid


# --------------------------------------------------------------------------- cluster

def _preseed_bootstrap(member: str) -> str:
    return json.dumps({
        # cluster.offline_threshold is set once the cluster exists: Incus 6.0.4 panics (nil
        # heartbeat task) when it is changed on a server that is not clustered yet.
        "config": {"core.https_address": f"{MEMBER_ADDRESS[member]}:{HTTPS_PORT}"},
        "cluster": {"server_name": member, "enabled": True},
        "storage_pools": [{"name": POOL, "driver": "dir"}],
        "profiles": [{"name": "default", "devices": {"root": {"path": "/", "pool": POOL, "type": "disk"}}}],
    })


def _preseed_join(member: str, token: str) -> str:
    return json.dumps({
        "cluster": {"enabled": True, "server_name": member,
                    "server_address": f"{MEMBER_ADDRESS[member]}:{HTTPS_PORT}",
                    "cluster_token": token,
                    "member_config": [{"entity": "storage-pool", "name": POOL, "key": "source", "value": ""}]},
    })


def cluster_members(via: str = "m1") -> dict[str, str]:
    """Member name -> status (ONLINE, OFFLINE, EVACUATED...) as ``incus cluster list`` says."""
    out = incus(via, "cluster", "list", "--format", "json", timeout=60).stdout
    return {m["server_name"]: str(m["status"]).upper() for m in json.loads(out)}


def wait_members(expected: dict[str, str], timeout: float = 120, via: str = "m1") -> dict[str, str]:
    deadline = time.monotonic() + timeout
    seen: dict[str, str] = {}
    while time.monotonic() < deadline:
        try:
            seen = cluster_members(via)
        except (ClusterError, subprocess.TimeoutExpired):
            seen = {}
        if all(seen.get(k) == v for k, v in expected.items()):
            return seen
        time.sleep(1)
    raise ClusterError(f"cluster members never reached {expected}; last seen {seen}")


def _is_clustered(member: str) -> bool:
    result = incus(member, "cluster", "list", "--format", "json", check=False, timeout=30)
    return result.returncode == 0 and member in {m["server_name"] for m in json.loads(result.stdout or "[]")}


def form_cluster() -> None:
    first, *others = MEMBERS
    if not _is_clustered(first):
        member_run(first, ["incus", "admin", "init", "--preseed"], input=_preseed_bootstrap(first))
    for member in others:
        if member in cluster_members(first):
            continue
        token = incus(first, "cluster", "add", member, "--quiet").stdout.strip().splitlines()[-1]
        member_run(member, ["incus", "admin", "init", "--preseed"], input=_preseed_join(member, token),
                   timeout=180)
    incus(first, "config", "set", "cluster.offline_threshold", str(OFFLINE_THRESHOLD_S))
    if incus(first, "project", "show", PROJECT, check=False).returncode != 0:
        incus(first, "project", "create", PROJECT, "-c", "features.images=false",
              "-c", "features.profiles=true", "-c", "features.storage.volumes=true")
        incus(first, "profile", "device", "add", "default", "root", "disk", "path=/", f"pool={POOL}",
              "--project", PROJECT)


# --------------------------------------------------------------------------- controller client

def client_dir() -> Path:
    return RUN_DIR / "client"


@dataclass(frozen=True)
class ClientConfig:
    """What a controller needs to reach the cluster over mTLS (from the controller netns)."""

    url: str              # https://10.231.0.11:8443 (any member's address works)
    cert: Path            # client certificate (PEM), trusted by the cluster
    key: Path             # its key
    server_cert: Path     # the cluster's certificate, to pin
    incus_conf: Path      # INCUS_CONF dir for the incus CLI (remote "cluster" is the default)
    project: str = PROJECT


def make_client() -> ClientConfig:
    """A client certificate for the controller, trusted by the cluster, and an incus CLI config."""
    d = client_dir()
    d.mkdir(parents=True, exist_ok=True)
    cert, key = d / "client.crt", d / "client.key"
    if not cert.exists():
        _run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:secp384r1",
              "-sha384", "-nodes", "-days", "3650", "-subj", "/CN=remotecli-controller",
              "-keyout", str(key), "-out", str(cert)])
        key.chmod(0o600)
    pem = cert.read_text()
    trusted = json.loads(incus("m1", "config", "trust", "list", "--format", "json").stdout)
    if not any(t.get("name") == "remotecli-controller" for t in trusted):
        # Written into the member's root, then added from there.
        staged = member_dir("m1") / "upper" / "root" / "remotecli-controller.crt"
        staged.parent.mkdir(parents=True, exist_ok=True)
        staged.write_text(pem)
        incus("m1", "config", "trust", "add-certificate", "/root/remotecli-controller.crt",
              "--name", "remotecli-controller")
    server_cert = d / "cluster.crt"
    server_cert.write_text((member_dir("m1") / "upper/var/lib/incus/cluster.crt").read_text())
    conf = d / "incus-conf"
    (conf / "servercerts").mkdir(parents=True, exist_ok=True)
    shutil.copy(cert, conf / "client.crt")
    shutil.copy(key, conf / "client.key")
    shutil.copy(server_cert, conf / "servercerts" / "cluster.crt")
    url = f"https://{MEMBER_ADDRESS['m1']}:{HTTPS_PORT}"
    (conf / "config.yml").write_text(
        f"default-remote: cluster\nremotes:\n  cluster:\n    addr: {url}\n    protocol: incus\n"
        "    auth_type: tls\n    public: false\n")
    return ClientConfig(url=url, cert=cert, key=key, server_cert=server_cert, incus_conf=conf)


def client_config() -> ClientConfig:
    d = client_dir()
    return ClientConfig(url=f"https://{MEMBER_ADDRESS['m1']}:{HTTPS_PORT}", cert=d / "client.crt",
                        key=d / "client.key", server_cert=d / "cluster.crt", incus_conf=d / "incus-conf")


def ctl_argv(argv: Sequence[str]) -> list[str]:
    """argv that runs a command in the controller netns (same filesystem as the root namespace)."""
    return ["ip", "netns", "exec", CTL_NS, *argv]


def ctl_incus_argv(args: Sequence[str]) -> list[str]:
    """The tree's incus client run from the controller netns over mTLS as the controller's cert."""
    tree = tree_dir()
    return ctl_argv(["env", f"INCUS_CONF={client_dir() / 'incus-conf'}",
                     str(tree / "usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2"), "--library-path",
                     f"{tree}/usr/lib/x86_64-linux-gnu", str(tree / "usr/bin/incus"), *args])


def ctl_incus(*args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    require_guard()
    return _run(ctl_incus_argv(args), check=check, timeout=timeout)


def ctl_socket(name: str) -> Path:
    return RUN_DIR / "ctl" / f"{name}.sock"


def _connectable(path: Path) -> bool:
    import socket

    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(2)
        try:
            sock.connect(str(path))
        except OSError:
            return False
    return True


def ctl_forward(member: str = "m1", port: int = HTTPS_PORT, name: str | None = None) -> Path:
    """A unix socket path in the root filesystem, forwarded by a process in the controller netns
    to ``member``'s address and ``port``.

    In-process tests (pytest in the root namespace, which cannot reach the test net) point an HTTP
    client at it, e.g. ``httpx.HTTPTransport(uds=path, cert=..., verify=...)`` with the URL
    ``https://10.231.0.11:8443``: the TLS session still runs end to end with the member; only the
    bytes travel through the forwarder."""
    path = ctl_socket(name or f"{member}-{port}")
    if path.exists() and _connectable(path):
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    procs = _make_member_cgroups("ctl")
    argv = ctl_argv([sys.executable, "-m", "tests.support.incus_cluster", "forward", str(path),
                     MEMBER_ADDRESS[member], str(port)])
    with open(path.with_suffix(".out"), "ab") as out:
        subprocess.Popen(argv, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                         start_new_session=True, preexec_fn=lambda: _enter_cgroups(procs))
    for _ in range(100):
        if path.exists() and _connectable(path):
            return path
        time.sleep(0.1)
    raise ClusterError(f"forwarder {path} did not come up: {path.with_suffix('.out').read_text()[-400:]}")


def _serve_forward(listen: Path, host: str, port: int) -> None:
    """Run in the controller netns: accept on ``listen`` (unix), connect to host:port (TCP), pump."""
    import asyncio

    async def pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
            if writer.can_write_eof():
                writer.write_eof()
        except (ConnectionError, OSError):
            pass

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.wait_for(asyncio.open_connection(host, port), 10)
        except (TimeoutError, OSError):
            writer.close()
            return
        await asyncio.gather(pump(reader, up_writer), pump(up_reader, writer))
        up_writer.close()
        writer.close()

    async def serve() -> None:
        listen.unlink(missing_ok=True)
        server = await asyncio.start_unix_server(handle, path=str(listen))
        async with server:
            await server.serve_forever()

    asyncio.run(serve())


# --------------------------------------------------------------------------- image

def busybox_image_tarball(path: Path) -> Path:
    """A unified Incus image tarball (metadata.yaml + rootfs/) of busybox, made without network."""
    busybox = Path("/usr/bin/busybox")
    if not busybox.exists():
        busybox = tree_dir() / "usr/bin/busybox"
    if not busybox.exists():
        raise ClusterError("busybox not found (scripts/install.sh installs busybox-static)")
    metadata = (f"architecture: x86_64\ncreation_date: {int(time.time())}\n"
                "properties:\n  description: remotecli test busybox\n  os: busybox\n  release: test\n")
    with tarfile.open(path, "w:gz") as tar:
        def add_bytes(name: str, data: bytes, mode: int = 0o644) -> None:
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), mode, int(time.time())
            tar.addfile(info, io.BytesIO(data))

        def add_dir(name: str) -> None:
            info = tarfile.TarInfo(name)
            info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, int(time.time())
            tar.addfile(info)

        def add_link(name: str, target: str) -> None:
            info = tarfile.TarInfo(name)
            info.type, info.linkname, info.mode = tarfile.SYMTYPE, target, 0o777
            tar.addfile(info)

        add_bytes("metadata.yaml", metadata.encode())
        for sub in ("rootfs", "rootfs/bin", "rootfs/sbin", "rootfs/etc", "rootfs/proc", "rootfs/sys",
                    "rootfs/dev", "rootfs/tmp", "rootfs/run", "rootfs/root", "rootfs/var"):
            add_dir(sub)
        add_bytes("rootfs/bin/busybox", busybox.read_bytes(), 0o755)
        for tool in ("sh", "sleep", "cat", "ls", "ps", "echo", "hostname", "ip", "mount", "true", "sync"):
            add_link(f"rootfs/bin/{tool}", "busybox")
        add_bytes("rootfs/sbin/init", b"#!/bin/sh\ntrap 'exit 0' PWR TERM\nwhile :; do sleep 1; done\n", 0o755)
        add_bytes("rootfs/etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n")
        add_bytes("rootfs/etc/group", b"root:x:0:\n")
    return path


def import_test_image() -> str:
    """Import the busybox image as ``rc-busybox`` (shared by every project without own images)."""
    listed = json.loads(incus("m1", "image", "list", "--format", "json").stdout)
    if any(a.get("name") == IMAGE_ALIAS for img in listed for a in img.get("aliases") or []):
        return IMAGE_ALIAS
    staged = member_dir("m1") / "upper" / "root" / "busybox.tar.gz"
    staged.parent.mkdir(parents=True, exist_ok=True)
    busybox_image_tarball(staged)
    incus("m1", "image", "import", "/root/busybox.tar.gz", "--alias", IMAGE_ALIAS, timeout=300)
    staged.unlink()
    return IMAGE_ALIAS


# --------------------------------------------------------------------------- up / down

_lock_depth = [0]


@contextlib.contextmanager
def _cluster_lock() -> Iterator[None]:
    """One up/down at a time per cluster (several test processes may share one); re-entrant."""
    import fcntl

    if _lock_depth[0]:
        _lock_depth[0] += 1
        try:
            yield
        finally:
            _lock_depth[0] -= 1
        return
    BASE_DIR.mkdir(parents=True, exist_ok=True)
    with open(BASE_DIR / ".lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        _lock_depth[0] = 1
        try:
            yield
        finally:
            _lock_depth[0] = 0
            fcntl.flock(handle, fcntl.LOCK_UN)


def up(*, log: bool = True) -> ClientConfig:
    """Bring the cluster up (idempotent): guard routes first, then tree, network, members."""
    with _cluster_lock():
        return _up(log=log)


def _up(*, log: bool) -> ClientConfig:
    def say(msg: str) -> None:
        if log:
            print(f"incus-cluster: {msg}", file=sys.stderr, flush=True)

    if os.geteuid() != 0:
        raise ClusterError("the Incus test cluster needs root")
    started = time.monotonic()
    ensure_guard_routes()  # before anything else, and checked
    say("guard routes in place: " + ", ".join(f"unreachable {p}" for p in GUARD_ROUTES_V4))
    tree = build_tree()
    say(f"tree {tree} ({time.monotonic() - started:.0f} s)")
    if RUN_DIR.exists() and any(holder_pid(m) is None for m in MEMBERS):
        # Left over from a run whose processes were killed: its members' state would wait for a
        # quorum that no longer exists. Start afresh (the guard routes stay).
        say("stale state from an earlier run: clearing it")
        down(keep_guard=True)
    if not RUN_DIR.exists():
        _kill_foreign()
    setup_network()
    _ensure_ns_dir()
    for member in MEMBERS:
        if missing_guard_routes():
            raise ClusterError("guard routes vanished")
        setup_member(member, tree)
        start_incusd(member)
        say(f"{member} incusd ready ({time.monotonic() - started:.0f} s)")
    form_cluster()
    wait_members({m: "ONLINE" for m in MEMBERS})
    config = make_client()
    import_test_image()
    for member in MEMBERS:
        ctl_forward(member)
    say(f"cluster up, 3 members ONLINE ({time.monotonic() - started:.0f} s)")
    return config


def _processes_in_our_netns() -> list[int]:
    """Processes in this cluster's network namespaces (members and controller), by namespace inode."""
    inodes = set()
    for ns in (CTL_NS, *(member_ns(m) for m in MEMBERS)):
        with contextlib.suppress(OSError):
            inodes.add(os.stat(_netns_path(ns)).st_ino)
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if os.stat(entry / "ns" / "net").st_ino in inodes:
                    found.append(int(entry.name))
    return found


def _kill_foreign() -> None:
    """Kill what an earlier cluster of this prefix left running in our namespaces (from another
    clone, or a run whose run directory is gone): only this harness makes these namespaces."""
    pids = _processes_in_our_netns()
    if not pids:
        return
    print(f"incus-cluster: killing {len(pids)} processes an earlier cluster left in its namespaces",
          file=sys.stderr, flush=True)
    for _ in range(50):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.2)
        pids = _processes_in_our_netns()
        if not pids:
            return
    raise ClusterError(f"processes of an earlier cluster survive in its namespaces: {pids}")


def _kill_member_processes(member: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while (pids := member_processes(member)) and time.monotonic() < deadline:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.2)
        for pid in pids:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)
    if member_processes(member):
        raise ClusterError(f"processes of {member} survive: {member_processes(member)}")


def _remove_cgroups(member: str) -> None:
    for cg in sorted({*_cgroup_dirs(member), *_find_cgroup_dirs(member)}):
        if cg.exists():
            for sub in sorted((p for p in cg.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
                with contextlib.suppress(OSError):
                    sub.rmdir()
            with contextlib.suppress(OSError):
                cg.rmdir()


def down(*, keep_guard: bool = False) -> None:
    """Tear everything down but the cached tree: processes, mounts, namespaces, run dir, guard routes."""
    with _cluster_lock():
        _down(keep_guard=keep_guard)


def _down(*, keep_guard: bool) -> None:
    for member in (*MEMBERS, "ctl"):
        if member_processes(member):
            _kill_member_processes(member)
    ns_dir = RUN_DIR / "ns"
    mounts = Path("/proc/self/mountinfo").read_text()
    for member in MEMBERS:
        for ns_file in _ns_files(member):
            if f" {ns_file} " in mounts:
                _run(["umount", str(ns_file)], check=False)
    if f" {ns_dir} " in Path("/proc/self/mountinfo").read_text():
        _run(["umount", str(ns_dir)], check=False)
    for member in (*MEMBERS, "ctl"):
        _remove_cgroups(member)
    for ns in (SWITCH_NS, CTL_NS, *(member_ns(m) for m in MEMBERS)):
        if _netns_exists(ns):
            _ip("netns", "del", ns, check=False)
    if RUN_DIR.exists():
        if any(str(RUN_DIR) in line for line in Path("/proc/self/mountinfo").read_text().splitlines()):
            raise ClusterError(f"mounts under {RUN_DIR} remain; not removing it")
        shutil.rmtree(RUN_DIR, ignore_errors=True)
    if not keep_guard:
        remove_guard_routes()


def leftovers() -> list[str]:
    """What a teardown must not leave: processes, mounts, namespaces, routes (the tree stays)."""
    found = []
    for member in (*MEMBERS, "ctl"):
        if member_processes(member):
            found.append(f"processes of {member}")
        found.extend(f"cgroup {cg}" for cg in sorted({*_cgroup_dirs(member), *_find_cgroup_dirs(member)})
                     if cg.exists())
    if any(str(RUN_DIR) in line for line in Path("/proc/self/mountinfo").read_text().splitlines()):
        found.append(f"mounts under {RUN_DIR}")
    for ns in (SWITCH_NS, CTL_NS, *(member_ns(m) for m in MEMBERS)):
        if _netns_exists(ns):
            found.append(f"netns {ns}")
    others = [p.name for p in Path("/run/netns").glob("rcic*-sw")] if Path("/run/netns").exists() else []
    for prefix in GUARD_ROUTES_V4:
        if not others and _ip("-4", "route", "show", "exact", prefix).stdout.strip():
            found.append(f"route {prefix}")
    return found


def evacuate(member: str, action: str = "migrate", via: str = "m1") -> None:
    """``incus cluster evacuate --action migrate`` (the member's instances move to the others)."""
    incus(via, "cluster", "evacuate", member, "--action", action, "--force", timeout=600)


def restore(member: str, via: str = "m1") -> None:
    incus(via, "cluster", "restore", member, "--force", timeout=600)


def status() -> dict[str, object]:
    return {"guard_routes_missing": missing_guard_routes(),
            "incusd": {m: incusd_pid(m) for m in MEMBERS},
            "members": cluster_members() if incusd_pid("m1") else {}}


def instances(project: str = PROJECT, via: str = "m1") -> list[dict[str, object]]:
    out = incus(via, "list", "--project", project, "--format", "json").stdout
    result: list[dict[str, object]] = json.loads(out)
    return result


def wait_for(predicate: object, timeout: float, interval: float = 1.0) -> Iterator[float]:
    """Yields elapsed seconds until the caller breaks or the timeout passes."""
    start = time.monotonic()
    while (elapsed := time.monotonic() - start) < timeout:
        yield elapsed
        time.sleep(interval)


# --------------------------------------------------------------------------- CLI

def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="incus_cluster", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("up")
    sub.add_parser("down")
    sub.add_parser("status")
    sub.add_parser("tree")
    sub.add_parser("leftovers")
    for name in ("cut", "restore-link", "kill", "start", "evacuate", "restore"):
        sub.add_parser(name).add_argument("member", choices=MEMBERS)
    p = sub.add_parser("member-exec")
    p.add_argument("member", choices=MEMBERS)
    p.add_argument("argv", nargs=argparse.REMAINDER)
    p = sub.add_parser("ctl-exec")
    p.add_argument("argv", nargs=argparse.REMAINDER)
    p = sub.add_parser("forward")
    p.add_argument("listen", type=Path)
    p.add_argument("host")
    p.add_argument("port", type=int)
    p = sub.add_parser("ctl-incus")
    p.add_argument("argv", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    try:
        if args.command == "up":
            print(json.dumps({k: str(v) for k, v in up().__dict__.items()}, indent=1))
        elif args.command == "down":
            down()
            left = leftovers()
            if left:
                print("left over: " + ", ".join(left), file=sys.stderr)
                return 1
        elif args.command == "status":
            print(json.dumps(status(), indent=1))
        elif args.command == "leftovers":
            left = leftovers()
            print("\n".join(left) or "nothing left")
            return 1 if left else 0
        elif args.command == "tree":  # talks to the Debian mirror only; no guard needed
            print(build_tree())
        elif args.command == "cut":
            cut_link(args.member)
        elif args.command == "restore-link":
            restore_link(args.member)
        elif args.command == "kill":
            print(kill_incusd(args.member))
        elif args.command == "start":
            print(start_incusd(args.member))
        elif args.command == "evacuate":
            evacuate(args.member)
        elif args.command == "restore":
            restore(args.member)
        elif args.command == "member-exec":
            require_guard()
            return subprocess.call(member_argv(args.member, args.argv))
        elif args.command == "ctl-exec":
            require_guard()
            return subprocess.call(ctl_argv(args.argv))
        elif args.command == "forward":
            _serve_forward(args.listen, args.host, args.port)
        elif args.command == "ctl-incus":
            require_guard()
            return subprocess.call(ctl_incus_argv(args.argv))
    except ClusterError as exc:
        print(f"incus-cluster: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
