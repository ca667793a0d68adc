"""Confining QEMU: an unprivileged user, and host firewall rules that keep guests off the host.

Why both: with QEMU's user-mode network a guest's connection to 10.0.2.2 (or to any of the host's
own addresses) becomes a connection that the QEMU *process* makes on the host, to the host's
loopback, where the controller's API and every other VM's agent port listen. Nothing inside QEMU
can tell those apart from a guest's legitimate Internet traffic, but the host's firewall can: the
packets leave from sockets owned by QEMU's user. So:

1. When the controller runs as root, QEMU drops to ``settings.qemu_user`` (a system user with no
   home, no shell, no groups) once it has opened its disks and sockets (``-run-with user=`` or,
   before QEMU 9, ``-runas``). Its files stay root-owned 0600 in 0700 directories, so a QEMU
   taken over by its guest can open no other VM's disk, secret or socket.
2. An nftables table ``inet remotecli_guests_<uid>`` (output hook) rejects every *new* connection
   that this user opens towards the host's own addresses (``oifname "lo"``: the kernel routes
   all locally addressed packets through lo) and towards ``guest_blocked_networks`` (cloud
   metadata by default), except the host's DNS resolver (port 53, which slirp's 10.0.2.3 uses) and
   ``guest_host_allowed_ports``. Replies on connections the controller opened to QEMU's port
   forwards are ``ct state established`` and pass.

The table is replaced atomically (one ``nft -f`` transaction) before every VM launch, so the
rules always match the settings, and a flushed ruleset is restored by the next boot or the
reconciler's next pass (``driver.guest_confinement(repair=True)``). It is left in place when the
controller stops, since VMs outlive controller restarts. ``remotecli doctor`` shows the state.

Contract: :func:`inspect` changes nothing. :func:`confine` never blocks for long (a ``useradd``
and an ``nft`` call, each well under a second) and is idempotent. It raises
:class:`~remotecli.errors.DriverUnavailable` only when ``guest_network_isolation = "on"`` and the
rules cannot be installed; with ``"auto"`` the reason is
returned in :attr:`Confinement.detail` instead.
"""

from __future__ import annotations

import functools
import os
import pwd
import shutil
import subprocess
from dataclasses import dataclass

from remotecli.config import Settings
from remotecli.errors import DriverUnavailable

DNS_PORT = 53


@dataclass(frozen=True)
class QemuUser:
    name: str
    uid: int
    gid: int


@dataclass(frozen=True)
class Confinement:
    """How the next QEMU process is confined."""

    user: QemuUser | None
    firewall: bool
    detail: str

    @property
    def runas_name(self) -> str | None:
        return self.user.name if self.user else None


def table_name(uid: int) -> str:
    return f"remotecli_guests_{uid}"


def ensure_qemu_user(name: str) -> QemuUser:
    """The system user ``name``, created (no home, no login shell) when it does not exist yet."""
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        useradd = shutil.which("useradd") or "/usr/sbin/useradd"
        nologin = shutil.which("nologin") or "/usr/sbin/nologin"
        result = subprocess.run(
            [useradd, "--system", "--no-create-home", "--home-dir", "/nonexistent", "--shell", nologin,
             "--user-group", name],
            capture_output=True,
            text=True,
            check=False,
            timeout=30,
        )
        # Exit 9: another controller created it between our lookup and useradd.
        if result.returncode not in (0, 9):
            raise DriverUnavailable(
                f"Could not create the system user {name!r} for QEMU: {result.stderr.strip() or result.returncode}. "
                "Create it yourself or set qemu_user to an existing user."
            ) from None
        entry = pwd.getpwnam(name)
    if entry.pw_uid == 0:
        raise DriverUnavailable(f"qemu_user {name!r} is root; choose an unprivileged user.")
    return QemuUser(name=entry.pw_name, uid=entry.pw_uid, gid=entry.pw_gid)


def firewall_ruleset(uid: int, allowed_ports: list[int], blocked_networks: list[str]) -> str:
    """The nft script that (re)creates this user's table in one transaction."""
    table = f"inet {table_name(uid)}"
    lines = [
        f"add table {table}",
        f"delete table {table}",
        f"table {table} {{",
        "  chain output {",
        "    type filter hook output priority filter; policy accept;",
        f"    meta skuid != {uid} return",
        "    ct state established,related accept",
        f'    oifname "lo" meta l4proto {{ tcp, udp }} th dport {DNS_PORT} accept comment "host DNS resolver"',
    ]
    if allowed_ports:
        ports = ", ".join(str(port) for port in allowed_ports)
        lines.append(f'    oifname "lo" tcp dport {{ {ports} }} accept comment "guest_host_allowed_ports"')
    lines += [
        '    oifname "lo" meta l4proto tcp counter reject with tcp reset comment "host services"',
        '    oifname "lo" counter reject comment "host services"',
    ]
    if blocked_networks:
        networks = ", ".join(blocked_networks)
        lines += [
            f'    ip daddr {{ {networks} }} meta l4proto tcp counter reject with tcp reset comment "blocked networks"',
            f'    ip daddr {{ {networks} }} counter reject comment "blocked networks"',
        ]
    lines += ["  }", "}", ""]
    return "\n".join(lines)


def apply_firewall(uid: int, allowed_ports: list[int], blocked_networks: list[str]) -> None:
    """Install or replace the table. Raises DriverUnavailable with the reason when it cannot."""
    nft = shutil.which("nft")
    if nft is None:
        raise DriverUnavailable("nft is not installed (Debian package nftables).")
    script = firewall_ruleset(uid, allowed_ports, blocked_networks)
    result = subprocess.run([nft, "-f", "-"], input=script, capture_output=True, text=True, check=False, timeout=30)
    if result.returncode != 0:
        raise DriverUnavailable(f"nft refused the guest firewall rules: {result.stderr.strip()[:300]}")


def firewall_present(uid: int) -> bool:
    """Is this user's table loaded (e.g. not flushed by an nftables restart)?

    Only a clear "no such table" answers False: any other failure of ``nft list`` (say, a
    concurrent ruleset change) answers True, so that a repair never replaces rules on a guess.
    """
    nft = shutil.which("nft")
    if nft is None:
        return False
    try:
        result = subprocess.run(
            [nft, "list", "table", "inet", table_name(uid)], capture_output=True, text=True, check=False, timeout=30
        )
    except (OSError, subprocess.TimeoutExpired):
        return True
    if result.returncode == 0:
        return True
    return "No such file or directory" not in result.stderr


def remove_firewall(uid: int) -> None:
    """Delete this user's table (tests, uninstall). Absent table: nothing to do."""
    nft = shutil.which("nft")
    if nft is not None:
        subprocess.run(
            [nft, "delete", "table", "inet", table_name(uid)], capture_output=True, check=False, timeout=30
        )


def _cannot_switch_user(settings: Settings) -> str | None:
    """Why QEMU cannot run as its own user here, or None when it can."""
    if os.geteuid() != 0:
        return "the controller is not root, so QEMU runs as its user and guests can reach the host's loopback"
    if not settings.qemu_user:
        return "qemu_user is empty, so QEMU runs as root"
    return None


def _confined_detail(user: QemuUser, settings: Settings) -> str:
    allowed = ", ".join(str(port) for port in settings.guest_host_allowed_ports) or "none"
    return f"QEMU runs as {user.name}; guests cannot reach the host (allowed host ports: {allowed})"


def confine(settings: Settings) -> Confinement:
    """Resolve QEMU's user and (re)install the firewall, as the settings ask (see module docstring)."""
    mode = settings.guest_network_isolation
    reason = _cannot_switch_user(settings)
    user = ensure_qemu_user(settings.qemu_user) if reason is None else None
    if mode == "off" or user is None:
        if mode == "off" and user is not None:
            remove_firewall(user.uid)  # the operator turned it off: rules from earlier runs go too
        if mode == "on":
            raise DriverUnavailable(f"guest_network_isolation is 'on' but {reason}.")
        who = f"QEMU runs as {user.name}" if user else reason
        return Confinement(user=user, firewall=False, detail=f"{who}; guest network isolation off")
    try:
        apply_firewall(user.uid, settings.guest_host_allowed_ports, settings.guest_blocked_networks)
    except DriverUnavailable as exc:
        if mode == "on":
            raise DriverUnavailable(f"guest_network_isolation is 'on' but {exc.message}") from None
        return Confinement(
            user=user, firewall=False, detail=f"QEMU runs as {user.name}; guest network isolation off: {exc.message}"
        )
    return Confinement(user=user, firewall=True, detail=_confined_detail(user, settings))


def inspect(settings: Settings) -> Confinement:
    """What is in force now, changing nothing (for ``doctor``): QEMU's user and whether this
    user's table is loaded. ``firewall`` False with a reason when it is not."""
    mode = settings.guest_network_isolation
    reason = _cannot_switch_user(settings)
    if reason is not None:
        return Confinement(None, False, reason)
    try:
        entry = pwd.getpwnam(settings.qemu_user)
    except KeyError:
        return Confinement(None, False, f"the user {settings.qemu_user!r} does not exist yet (created at the first "
                                        "VM boot or 'remotecli up')")
    user = QemuUser(entry.pw_name, entry.pw_uid, entry.pw_gid)
    if mode == "off":
        return Confinement(user, False, f"QEMU runs as {user.name}; guest network isolation off")
    if not firewall_present(user.uid):
        return Confinement(user, False, f"QEMU runs as {user.name}; the guest firewall table "
                                        f"{table_name(user.uid)} is not loaded (restored at the next VM boot, "
                                        "reconciler pass or 'remotecli up')")
    return Confinement(user, True, _confined_detail(user, settings))


@functools.cache
def supports_run_with(qemu_binary: str) -> bool:
    """QEMU 9+ spells the privilege drop ``-run-with user=``; older ones ``-runas``."""
    try:
        result = subprocess.run([qemu_binary, "-help"], capture_output=True, text=True, check=False, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return "-run-with" in result.stdout


def runas_args(qemu_binary: str, user: QemuUser | None) -> list[str]:
    if user is None:
        return []
    if supports_run_with(qemu_binary):
        return ["-run-with", f"user={user.name}"]
    return ["-runas", user.name]

