"""Snapshot templates and restored VMs (ADR 0012, "Snapshot restore").

A **template** agent is started from a config disk with ``"template": true`` and an empty
``agent_secret``: it answers no request at all (every one is refused with 401), warms the page
cache (Chromium is started once on the display and ended, so its files are in RAM) and then logs
``template_ready``; the host saves the VM with QEMU migration at that point. The saved memory
therefore holds no secret.

A VM **restored** from that file runs the same agent, still without a secret. The host has given
the restored QEMU a new config disk (vdb) with the VM's own id, hostname and secret, plus a
``restore_seed`` (64 random bytes from the host, hex). On every connection while it has no
secret, the agent re-reads the config disk past the guest's page cache (which still holds the
template's document); once the disk carries a secret it adopts the document (one time), then
authenticates the request as usual. Anyone can make the agent re-read its own config disk; only
the controller can write it, so nobody else can choose the secret.

At adoption, before any request is served: the kernel RNG is reseeded (``RNDADDENTROPY`` with the
host's seed and bytes from the fresh virtio-rng device, then ``RNDRESEEDCRNG``, so two VMs restored
from one template never share RNG output); the wall clock is set from the RTC (it stood still
while the template was saved; the config's ``restore_time`` is the fallback); and the hostname is
set. Standard library only, like the rest of the guest package.
"""

import calendar
import contextlib
import fcntl
import json
import os
import shutil
import socket
import struct
import subprocess
import tempfile
import threading
import time
import urllib.request

from .config import AgentConfig, ConfigError, _read_until_nul, load_config, parse_config
from .log import log

RNDADDENTROPY = 0x40085203  # _IOW('R', 0x03, int[2])
RNDRESEEDCRNG = 0x5207  # _IO('R', 0x07)
BLKFLSBUF = 0x1261  # _IO(0x12, 97)
RTC_RD_TIME = 0x80247009  # _IOR('p', 0x09, struct rtc_time)
TEMPLATE_READY_EVENT = "template_ready"
WARM_TIMEOUT_S = 120.0


class TemplateState:
    """Held by an agent started as a template (or restored from one) until it adopts a config."""

    def __init__(self, config_path):
        self.config_path = config_path
        self.adopted = False
        self._lock = threading.Lock()

    def adopt(self, agent):
        """Re-read the config disk; when it carries a secret, take it over. Returns True once adopted."""
        with self._lock:
            if self.adopted:
                return True
            try:
                doc = _read_fresh(self.config_path)
            except (OSError, ValueError):
                return False
            if doc.get("template") or not doc.get("agent_secret"):
                return False  # still the template's document (or the page cache's copy of it)
            try:
                config = parse_config(doc)
            except ConfigError as exc:
                log("restore_config_invalid", level="error", detail=str(exc))
                return False
            seeded = reseed(doc.get("restore_seed"))
            clock = set_clock(doc.get("restore_time"))
            _set_hostname(config.hostname)
            agent.config = config
            agent._secret = config.agent_secret.encode("utf-8")
            agent.boot_id = os.urandom(16).hex()  # the kernel's boot_id is the template's
            self.adopted = True
            log("restored", vm_id=config.vm_id, reseeded=seeded, clock=clock)
            return True

    def start(self, agent):
        """Template only: warm the page cache, then log ``template_ready`` (the host waits for it)."""
        threading.Thread(target=_warm_then_ready, args=(agent,), name="template-warm", daemon=True).start()


def load(path):
    """(config, template state or None). A template's config has ``template: true`` and no secret."""
    try:
        doc = _read_doc(path)
    except (OSError, ValueError):
        doc = {}
    if isinstance(doc, dict) and doc.get("template") is True:
        config = AgentConfig(
            vm_id=str(doc.get("vm_id", "template")),
            vm_type=str(doc.get("vm_type", "")),
            agent_secret="",
            agent_port=int(doc.get("agent_port", 7000)),
            hostname=str(doc.get("hostname", "")),
            cli_user=str(doc.get("cli_user", "")),
        )
        return config, TemplateState(path)
    return load_config(path), None


def _read_doc(path):
    raw = _read_until_nul(path)
    doc = json.loads(raw.decode("utf-8"))
    if not isinstance(doc, dict):
        raise ValueError("config document is not a JSON object")
    return doc


def _read_fresh(path):
    """The config document as it is on the device now, not as the page cache remembers it."""
    fd = os.open(path, os.O_RDONLY)
    try:
        with contextlib.suppress(OSError):
            fcntl.ioctl(fd, BLKFLSBUF)  # block device: drop its buffers (root only)
        with contextlib.suppress(OSError, AttributeError):
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    return _read_doc(path)


def reseed(seed_hex):
    """Mix fresh host randomness into the kernel RNG and force a reseed. Returns what was mixed in."""
    material = b""
    sources = []
    if isinstance(seed_hex, str):
        with contextlib.suppress(ValueError):
            material += bytes.fromhex(seed_hex)[:256]
            sources.append("config")
    with contextlib.suppress(OSError):
        fd = os.open("/dev/hwrng", os.O_RDONLY | os.O_NONBLOCK)
        try:
            data = os.read(fd, 64)
            if data:
                material += data
                sources.append("hwrng")
        finally:
            os.close(fd)
    if not material:
        return "none"
    material += struct.pack("<dQ", time.time(), time.monotonic_ns())
    try:
        fd = os.open("/dev/urandom", os.O_WRONLY)
    except OSError:
        return "failed"
    try:
        credit = 8 * (len(material) - 16)
        fcntl.ioctl(fd, RNDADDENTROPY, struct.pack("ii", credit, len(material)) + material)
        fcntl.ioctl(fd, RNDRESEEDCRNG)
    except OSError:
        with contextlib.suppress(OSError):
            os.write(fd, material)  # at least mixed in (no credit, no forced reseed)
        return "mixed:" + "+".join(sources)
    finally:
        os.close(fd)
    return "+".join(sources)


def _rtc_time():
    fd = os.open("/dev/rtc0", os.O_RDONLY)
    try:
        raw = fcntl.ioctl(fd, RTC_RD_TIME, bytes(36))
    finally:
        os.close(fd)
    sec, minute, hour, mday, mon, year = struct.unpack("9i", raw)[:6]
    return calendar.timegm((year + 1900, mon + 1, mday, hour, minute, sec, 0, 0, 0))


def set_clock(restore_time):
    """The wall clock stood still while the template was on disk: set it again."""
    now = None
    source = "none"
    with contextlib.suppress(OSError, ValueError, struct.error, OverflowError):
        now = float(_rtc_time())
        source = "rtc"
    if now is None and isinstance(restore_time, int | float):
        now, source = float(restore_time), "config"
    if now is None:
        return source
    try:
        time.clock_settime(time.CLOCK_REALTIME, now)
    except (OSError, PermissionError):
        return "failed"
    return source


def _set_hostname(hostname):
    if not hostname or os.geteuid() != 0:
        return
    with contextlib.suppress(OSError):
        socket.sethostname(hostname)
    with contextlib.suppress(OSError):
        with open("/etc/hostname", "w", encoding="ascii") as handle:
            handle.write(hostname + "\n")
        with open("/etc/hosts", "w", encoding="ascii") as handle:
            handle.write(f"127.0.0.1\tlocalhost\n127.0.1.1\t{hostname}\n::1\tlocalhost ip6-localhost ip6-loopback\n")


def _listening(port):
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _warm_then_ready(agent):
    started = time.monotonic()
    warmed = False
    try:
        if agent.config.vm_type == "browser":
            deadline = time.monotonic() + WARM_TIMEOUT_S
            # The display and the VNC server first: the template is saved with both running.
            while time.monotonic() < deadline and not (os.path.exists("/tmp/.X11-unix/X0") and _listening(5900)):
                time.sleep(0.2)
            warmed = _warm_chromium(deadline)
    except Exception as exc:  # warming is an optimisation: the template is still usable
        log("template_warm_failed", level="warning", error=type(exc).__name__, detail=str(exc)[:200])
    os.sync()
    log(TEMPLATE_READY_EVENT, warmed=warmed, duration_s=round(time.monotonic() - started, 2))


def _warm_chromium(deadline):
    """Start Chromium once on the display until its DevTools answer, then end it: its binary,
    libraries and fonts stay in the page cache, which the snapshot keeps."""
    executable = shutil.which("chromium")
    if executable is None:
        return False
    import pwd

    entry = pwd.getpwnam("browser")
    top = tempfile.mkdtemp(prefix="remotecli-warm-")
    os.chown(top, entry.pw_uid, entry.pw_gid)
    port = 9333
    argv = [executable, "--no-first-run", "--no-default-browser-check", "--disable-gpu", "--disable-dev-shm-usage",
            "--no-sandbox", f"--user-data-dir={top}/profile", f"--remote-debugging-port={port}",
            "--remote-debugging-address=127.0.0.1", "--app=about:blank"]
    env = {"PATH": "/usr/bin:/bin", "HOME": top, "DISPLAY": ":0", "LANG": "C.UTF-8"}
    proc = subprocess.Popen(argv, env=env, cwd=top, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True, user=entry.pw_uid,
                            group=entry.pw_gid, extra_groups=[])
    ok = False
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            with contextlib.suppress(OSError, ValueError), \
                    urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=2) as answer:
                if any(item.get("type") == "page" for item in json.load(answer)):
                    ok = True
                    break
            time.sleep(0.3)
        time.sleep(1.0)
    finally:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, 15)
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, 9)
            proc.wait(5)
        shutil.rmtree(top, ignore_errors=True)
    return ok
