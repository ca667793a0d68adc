"""The VM launcher that runs as PID 1 of a VM's Incus container (stdlib only; pushed by the driver).

It is not imported by the controller: the driver pushes this file into the container and Incus
starts it as the container's init (``raw.lxc: lxc.init.cmd``). It

* terminates TLS for the guest agent: listens on ``tls_port`` with the VM's own certificate (made
  and pinned by the controller) and forwards each connection to QEMU's host forward on the
  container's loopback, so the guest agent is unchanged and nothing leaves the member in plain HTTP;
* formats the home volume file once when the driver asks (a new volume), never over an existing one;
* runs QEMU in the foreground (the argv the qemu driver builds), booting again when the kernel
  stalls before the initramfs under TCG, as the qemu driver does;
* on SIGPWR/SIGTERM (Incus stopping the container) asks the guest to power down over QMP.

When QEMU exits, this process exits and the container stops: Incus then reports the instance
stopped (and sends a lifecycle event), which is how the controller learns the VM died.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from typing import Any

D = "/var/lib/remotecli-vm"


def log(message: str) -> None:
    print(f"remotecli-launch: {message}", flush=True)


def pump(src: socket.socket, dst: socket.socket) -> None:
    try:
        while True:
            data = src.recv(65536)
            if not data:
                break
            dst.sendall(data)
    except OSError:
        pass
    finally:
        for sock, how in ((dst, socket.SHUT_WR), (src, socket.SHUT_RD)):
            with contextlib.suppress(OSError):
                sock.shutdown(how)


def handle(context: ssl.SSLContext, client: socket.socket, target_port: int) -> None:
    try:
        client.settimeout(15)
        tls = context.wrap_socket(client, server_side=True)
        tls.settimeout(None)
    except (OSError, ssl.SSLError):
        client.close()
        return
    try:
        upstream = socket.create_connection(("127.0.0.1", target_port), timeout=10)
        upstream.settimeout(None)
    except OSError:
        tls.close()
        return
    back = threading.Thread(target=pump, args=(upstream, tls), daemon=True)
    back.start()
    pump(tls, upstream)
    back.join()
    tls.close()
    upstream.close()


def serve_tls(cfg: dict[str, Any]) -> None:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cfg.get("tls_cert", f"{D}/agent-tls.crt"), cfg.get("tls_key", f"{D}/agent-tls.key"))
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind((cfg.get("tls_bind", "0.0.0.0"), cfg["tls_port"]))
    server.listen(64)
    while True:
        client, _ = server.accept()
        threading.Thread(target=handle, args=(context, client, cfg["hostfwd_port"]), daemon=True).start()


def loopback_up() -> None:
    """Bring the container's loopback up (no init system runs here to do it): QEMU's host forward
    and the TLS forward meet on 127.0.0.1, and Incus' proxy device connects there."""
    import fcntl
    import struct

    siocgifflags, siocsifflags, iff_up = 0x8913, 0x8914, 0x1
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        request = struct.pack("16sH14x", b"lo", 0)
        flags = struct.unpack("16sH14x", fcntl.ioctl(sock.fileno(), siocgifflags, request))[1]
        if not flags & iff_up:
            fcntl.ioctl(sock.fileno(), siocsifflags, struct.pack("16sH14x", b"lo", flags | iff_up))


def qmp(command: str) -> None:
    path = f"{D}/vm/qmp.sock"
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(3)
            sock.connect(path)
            sock.recv(65536)
            for cmd in ("qmp_capabilities", command):
                sock.sendall(json.dumps({"execute": cmd}).encode() + b"\n")
                sock.recv(65536)
    except OSError as exc:
        log(f"qmp {command}: {exc}")


def format_home(cfg: dict[str, Any]) -> None:
    home: dict[str, Any] | None = cfg.get("home")
    if not home or not home.get("format"):
        return
    path = str(home["file"])
    if os.path.exists(path):
        return  # never formatted again
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as handle:
        handle.truncate(int(home["size_bytes"]))
    uid = int(home["owner_uid"])
    subprocess.run([*cfg.get("mkfs", ["mkfs.ext4"]), "-q", "-F", "-t", "ext4", "-L", "rc-home", "-m", "0",
                    "-E", f"root_owner={uid}:{uid}", tmp], check=True)
    os.link(tmp, path)
    os.unlink(tmp)
    log("home volume formatted")


def boot(cfg: dict[str, Any]) -> subprocess.Popen[bytes] | None:
    console = f"{D}/vm/console.log"
    marker = str(cfg["marker"]).encode()
    attempts = int(cfg["attempts"]) if cfg["tcg"] else 1
    for attempt in range(1, attempts + 1):
        if os.path.exists(console):
            os.replace(console, console + ".1")
        with open(f"{D}/vm/qemu.log", "wb") as qemu_log:
            proc = subprocess.Popen(cfg["argv"], stdin=subprocess.DEVNULL, stdout=qemu_log, stderr=qemu_log,
                                    cwd=f"{D}/vm")
        if not cfg["tcg"]:
            return proc
        deadline = time.monotonic() + cfg["early_boot_timeout"] * max(1.0, os.getloadavg()[0] / (os.cpu_count() or 1))
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                with open(console, "rb") as handle:
                    if marker in handle.read(256 * 1024):
                        log(f"guest started (attempt {attempt})")
                        return proc
            except OSError:
                pass
            time.sleep(0.05)
        log(f"guest stalled or QEMU exited in early boot (attempt {attempt} of {attempts})")
        proc.kill()
        proc.wait()
    return None


def main() -> None:
    with open(f"{D}/launch.json") as handle:
        cfg: dict[str, Any] = json.load(handle)
    try:
        loopback_up()
    except OSError as exc:
        log(f"could not bring the loopback up: {exc}")
    threading.Thread(target=serve_tls, args=(cfg,), daemon=True).start()
    state: dict[str, subprocess.Popen[bytes] | None] = {"proc": None}

    def on_stop(signum: int, frame: object) -> None:
        proc = state["proc"]
        if proc is None or proc.poll() is not None:
            sys.exit(0)
        log(f"signal {signum}: asking the guest to power down")
        threading.Thread(target=qmp, args=("system_powerdown",), daemon=True).start()

    for sig in (signal.SIGPWR, signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_stop)
    format_home(cfg)
    proc = boot(cfg)
    if proc is None:
        log("the guest did not boot")
        sys.exit(3)
    state["proc"] = proc
    while True:
        try:
            code = proc.wait()
            break
        except InterruptedError:
            continue
    log(f"QEMU exited with {code}")
    sys.exit(0 if code == 0 else 1)


if __name__ == "__main__":
    main()
