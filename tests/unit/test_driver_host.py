"""drivers/host.py: the /proc, file and config-disk helpers both real drivers use."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

from remotecli.agent.guest import config as guest_config
from remotecli.agent.protocol import CONFIG_DISK_SIZE
from remotecli.drivers import host
from remotecli.drivers.base import VmSpec

SECRET = "agent-secret-" + "k" * 32


def test_process_facts_of_a_live_and_an_ended_process() -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)", "marker-arg"])
    try:
        deadline = time.monotonic() + 10
        while host.proc_cmdline(child.pid)[-1:] != ["marker-arg"] and time.monotonic() < deadline:
            time.sleep(0.01)  # between fork and exec the child still shows the parent's command line
        assert host.proc_cmdline(child.pid)[-1] == "marker-arg"
        assert not host.gone_or_zombie(child.pid)
        assert child.pid in set(host.other_pids())
        assert os.getpid() not in set(host.other_pids())
        child.kill()
        # Killed but not yet waited for: a zombie, which counts as gone.
        deadline = time.monotonic() + 10
        while not host.gone_or_zombie(child.pid) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert host.gone_or_zombie(child.pid)
        host.reap(child.pid)
    finally:
        child.kill()
        child.wait()
    assert host.proc_cmdline(child.pid) == []
    assert host.gone_or_zombie(child.pid)


def test_read_pid(tmp_path: Path) -> None:
    path = tmp_path / "x.pid"
    assert host.read_pid(path) is None
    for text, expected in (("123\n", 123), ("0", None), ("-5", None), ("abc", None)):
        path.write_text(text)
        assert host.read_pid(path) == expected


def test_write_private_file_is_atomic_and_private(tmp_path: Path) -> None:
    path = tmp_path / "record.json"
    old_umask = os.umask(0)
    try:
        host.write_private_file(path, b'{"a": 1}')
        host.write_private_file(path, b"x" * 300_000)
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_bytes() == b"x" * 300_000
    assert sorted(p.name for p in tmp_path.iterdir()) == ["record.json"]  # no temporary file left
    # A leftover temporary file (a crash mid-write) does not stop the next write.
    (tmp_path / ".record.json.tmp").write_bytes(b"stale")
    host.write_private_file(path, b"{}")
    assert path.read_bytes() == b"{}" and not (tmp_path / ".record.json.tmp").exists()


def test_read_json_object(tmp_path: Path) -> None:
    path = tmp_path / "doc.json"
    assert host.read_json_object(path) == {}
    path.write_text("[1, 2]")
    assert host.read_json_object(path) == {}
    path.write_text("{not json")
    assert host.read_json_object(path) == {}
    path.write_text(json.dumps({"port": 7000}))
    assert host.read_json_object(path) == {"port": 7000}


def test_config_disk_is_what_the_guest_reads(tmp_path: Path) -> None:
    spec = VmSpec(vm_id="vm-AB_1", vm_type="cli", vcpus=1, memory_mib=256, directory=tmp_path, agent_secret=SECRET)
    disk = host.config_disk(spec)
    assert SECRET not in repr(disk)
    path = tmp_path / "config.img"
    host.write_private_file(path, disk.encode())
    assert path.stat().st_size == CONFIG_DISK_SIZE
    document = json.loads(path.read_bytes().partition(b"\0")[0])
    # The QEMU driver's document: these keys, in this order, and no vsock port.
    assert list(document) == ["vm_id", "vm_type", "agent_secret", "agent_port", "hostname", "cli_user"]
    config = guest_config.load_config(str(path), wait_s=0)
    assert (config.vm_id, config.hostname, config.agent_port, config.agent_vsock_port) == ("vm-AB_1", "vm-ab-1", 7000,
                                                                                           None)
    firecracker = json.loads(host.config_disk(spec, vsock_port=7000).encode().partition(b"\0")[0])
    assert firecracker == {**document, "agent_vsock_port": 7000}
