"""Host-side helpers every driver needs: process facts from ``/proc``, private files written
atomically, JSON records, and the config disk a VM boots with.

Linux only (``/proc``). Nothing here logs, and nothing here ever sees a secret except
``config_disk``, whose result holds the agent secret (never log it).
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from remotecli.agent.protocol import ConfigDisk, hostname_for
from remotecli.drivers.base import HostResources, VmSpec

# -- processes --------------------------------------------------------------------------------


def read_pid(path: Path) -> int | None:
    """The pid in a pid file, or None when it is missing or not a positive number."""
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() and int(text) > 0 else None


def proc_cmdline(pid: int) -> list[str]:
    """The process's argv from ``/proc/<pid>/cmdline``; ``[]`` when it is gone (or a zombie)."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [part.decode("utf-8", errors="replace") for part in raw.split(b"\x00") if part]


def gone_or_zombie(pid: int) -> bool:
    """Has the process exited (no ``/proc`` entry, or state Z or X)?"""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    # "pid (comm) S ..." -- comm may contain spaces and parentheses: the state follows the last ')'.
    return stat.rpartition(")")[2].split()[:1] in (["Z"], ["X"])


def reap(pid: int) -> None:
    """Collect the exit status if ``pid`` happens to be our child (e.g. the controller is PID 1)."""
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


def other_pids() -> Iterator[int]:
    """Every process id in ``/proc`` except this process's own."""
    me = os.getpid()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != me:
            yield int(entry.name)


def local_resources(meminfo: Path = Path("/proc/meminfo")) -> HostResources:
    """This machine's memory (``MemTotal``) and CPUs (the ones this process may run on)."""
    memory_kib = 0
    try:
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemTotal:"):
                memory_kib = int(line.split()[1])
                break
    except (OSError, ValueError, IndexError):
        memory_kib = 0
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    return HostResources(memory_mib=memory_kib // 1024, vcpus=max(1, cpus),
                         source="this host's /proc/meminfo and CPU count")


# -- files ------------------------------------------------------------------------------------


def write_private_file(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Replace ``path`` atomically with ``data``, created with ``mode`` (never readable by other
    users, even briefly: the temporary file is new, not followed through a link, and fsynced)."""
    tmp = path.with_name(f".{path.name}.tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    try:
        os.fchmod(fd, mode)  # whatever the umask
        view = memoryview(data)
        while view:
            written = os.write(fd, view)
            view = view[written:]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def read_json_object(path: Path) -> dict[str, Any]:
    """A JSON object from a file; ``{}`` when the file is missing, unreadable or not an object."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


# -- the config disk ----------------------------------------------------------------------------


def config_disk(spec: VmSpec, *, vsock_port: int | None = None) -> ConfigDisk:
    """The config disk document for ``spec`` (contract 0001; ``agent.protocol.ConfigDisk``).

    ``vsock_port``: the guest port the host reaches the agent on over vsock (Firecracker).
    Holds the agent secret: write it with ``write_private_file``, never log it.
    """
    from remotecli.images.recipes import RECIPES

    recipe = RECIPES.get(spec.vm_type)
    return ConfigDisk(
        vm_id=spec.vm_id,
        vm_type=spec.vm_type,
        agent_secret=spec.agent_secret,
        agent_port=spec.agent_guest_port,
        hostname=hostname_for(spec.vm_id),
        cli_user=recipe.primary_user.name if recipe else "cli",
        agent_vsock_port=vsock_port,
        **({
            "home_volume_id": spec.home.volume_id,
            "home_serial": spec.home.serial,
            "home_device": spec.home.guest_device,
            "home_path": spec.home.mount_path,
        } if spec.home is not None else {}),
    )
