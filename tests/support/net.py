"""Host checks for tests: is a process gone, does anything still listen on a port."""

from __future__ import annotations

from pathlib import Path


def qemu_pids_naming(text: str) -> list[int]:
    """QEMU processes on this host whose command line contains ``text`` (a VM directory, a volume file)."""
    marker = text.encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if b"qemu-system" in argv.split(b"\0", 1)[0] and marker in argv:
            found.append(int(entry.name))
    return found


def listening(port: int) -> bool:
    """True while a socket LISTENs on ``port`` (IPv4 or IPv6) on this host.

    After a VM is destroyed its forwarded port must not be listened on any more. A plain bind()
    test is the wrong check: the kernel keeps closed connections (FIN_WAIT, TIME_WAIT) on the port
    for a while after the process is gone, which is not a leak.
    """
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            local, state = fields[1], fields[3]
            if state == "0A" and int(local.rsplit(":", 1)[1], 16) == port:
                return True
    return False


def stops_listening(port: int, timeout: float = 10.0) -> bool:
    """True once nothing LISTENs on ``port``; the kernel tears a killed process's sockets down a
    moment after the process is gone, so poll for a few seconds."""
    import time

    deadline = time.monotonic() + timeout
    while listening(port):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def process_gone(pid: int, timeout: float = 10.0) -> bool:
    """True once ``pid`` no longer runs (gone, or a zombie waiting for init to reap it)."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, IndexError):
            return True
        if state == "Z":
            return True
        time.sleep(0.05)
    return False
