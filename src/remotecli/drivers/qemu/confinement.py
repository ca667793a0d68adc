"""Confining QEMU: one unprivileged uid per VM, and host firewall rules that keep guests off the
host and off private networks.

Why both: with QEMU's user-mode network a guest's connection to 10.0.2.2 (or to any of the host's
own addresses) becomes a connection that the QEMU *process* makes on the host, to the host's
loopback, where the controller's API and every other VM's agent port listen; a connection to
10.1.2.3 becomes the QEMU process's connection to the operator's network. Nothing inside QEMU can
tell those apart from a guest's legitimate Internet traffic, but the host's firewall can: the
packets leave from sockets owned by QEMU's uid. So:

1. When the controller runs as root, each QEMU drops to a uid of its own, taken from
   ``settings.qemu_uid_range`` (``-runas uid:gid``, or ``-run-with user=uid:gid`` from QEMU 9; no
   passwd entry is needed), once it has opened its disks and sockets. CLI VMs take uids from the
   first half of the range, Browser VMs from the second, so the firewall can tell the two types
   apart. Two live VMs never share a uid (:func:`allocate_uid`: a lock file in the VMs directory,
   the uid recorded in the VM's directory, running QEMU processes checked in ``/proc``), so a
   QEMU taken over by its guest can neither signal nor ptrace another VM's QEMU, and its files stay
   root-owned 0600 in 0700 directories, so it can open no other VM's disk, secret or socket.
2. An nftables table ``inet remotecli_guests_<first>_<last>`` (output hook) judges every *new*
   connection that a uid of the range opens (:func:`firewall_ruleset`; the rule is on the
   destination address of the connection QEMU opens, so a DNS answer that points a public name at
   a private address changes nothing):

   - the host's own addresses (``oifname "lo"``: the kernel routes all locally addressed packets
     through lo) are refused, except the host's DNS resolver (port 53, which slirp's 10.0.2.3 uses)
     and ``guest_host_allowed_ports``;
   - the nameservers of ``/etc/resolv.conf`` on port 53 pass (slirp forwards the guest's DNS there);
   - ``guest_blocked_networks`` are refused (extra blocks; they win over the allowed networks);
   - ``guest_allowed_networks`` (every guest) and ``guest_allowed_networks_cli`` /
     ``guest_allowed_networks_browser`` (one VM type) pass: networks, or ``network:port`` pairs;
   - every private and special range (:data:`PRIVATE_IPV4`, :data:`PRIVATE_IPV6`) is refused;
   - the rest (the public Internet) passes.

   Replies on connections the controller opened to QEMU's port forwards are
   ``ct state established`` and pass.

The table is replaced atomically (one ``nft -f`` transaction) before every VM launch, so the
rules always match the settings, and a flushed ruleset is restored by the next boot or the
reconciler's next pass (``driver.guest_confinement(repair=True)``). It is left in place when the
controller stops, since VMs outlive controller restarts. ``remotecli doctor`` shows the state and
the effective policy (:func:`egress_policy`).

Contract: :func:`inspect` changes nothing. :func:`confine` never blocks for long (an ``nft`` call,
well under a second) and is idempotent. It raises :class:`~remotecli.errors.DriverUnavailable`
only when ``guest_network_isolation = "on"`` and the rules cannot be installed; with ``"auto"``
the reason is returned in :attr:`Confinement.detail` instead.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import grp
import ipaddress
import os
import pwd
import shutil
import subprocess
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from remotecli.config import AllowedDestination, Settings, parse_allowed_destination
from remotecli.errors import DriverUnavailable

DNS_PORT = 53
RESOLV_CONF = Path("/etc/resolv.conf")
# Refused by default for every guest (issue 15): private, shared, loopback, link-local (cloud
# metadata), "this network", multicast and reserved. guest_allowed_networks re-opens parts.
PRIVATE_IPV4: tuple[str, ...] = (
    "0.0.0.0/8", "10.0.0.0/8", "100.64.0.0/10", "127.0.0.0/8", "169.254.0.0/16", "172.16.0.0/12",
    "192.168.0.0/16", "224.0.0.0/4", "240.0.0.0/4",
)
# Guests get no IPv6 (QEMU's netdev has ipv6=off), but a QEMU taken over by its guest could open
# IPv6 sockets itself: unspecified, loopback, unique local, link-local, site-local and multicast.
PRIVATE_IPV6: tuple[str, ...] = ("::/128", "::1/128", "fc00::/7", "fe80::/10", "fec0::/10", "ff00::/8")
# The name of the file in a VM directory that records the VM's QEMU uid (one line, the number).
UID_FILE = "qemu.uid"
UID_LOCK = ".qemu-uids.lock"
VM_TYPES_ORDER = ("cli", "browser")


@dataclass(frozen=True)
class UidRange:
    """An inclusive range of uids (and, equal to them, gids) for QEMU processes."""

    first: int
    last: int

    @property
    def nft(self) -> str:
        return f"{self.first}-{self.last}"

    def __contains__(self, uid: object) -> bool:
        return isinstance(uid, int) and self.first <= uid <= self.last

    def for_type(self, vm_type: str) -> UidRange:
        """CLI VMs: the first half; Browser VMs: the second half."""
        middle = self.first + (self.last - self.first + 1) // 2
        return UidRange(middle, self.last) if vm_type == "browser" else UidRange(self.first, middle - 1)


@dataclass(frozen=True)
class QemuUser:
    """The uid and gid one QEMU process drops to (no passwd entry)."""

    uid: int
    gid: int

    @property
    def name(self) -> str:
        return f"{self.uid}:{self.gid}"


@dataclass(frozen=True)
class Confinement:
    """How QEMU processes are confined: the uid range they drop to (None: they stay the
    controller's user), whether the firewall is in force, and a sentence for people."""

    uids: UidRange | None
    firewall: bool
    detail: str


def uid_range(settings: Settings) -> UidRange | None:
    bounds = settings.qemu_uids
    return UidRange(*bounds) if bounds else None


def table_name(uids: UidRange) -> str:
    return f"remotecli_guests_{uids.first}_{uids.last}"


def host_resolvers(path: Path = RESOLV_CONF) -> list[str]:
    """The non-loopback nameservers of resolv.conf (loopback ones pass through the lo rule)."""
    found: list[str] = []
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return found
    for line in lines:
        parts = line.split()
        if len(parts) >= 2 and parts[0] == "nameserver":
            try:
                address = ipaddress.ip_address(parts[1].split("%", 1)[0])
            except ValueError:
                continue
            if not address.is_loopback and str(address) not in found:
                found.append(str(address))
    return found


def _family(network: str) -> str:
    return "ip6" if ":" in network else "ip"


def _split_families(networks: Iterable[str]) -> Iterator[tuple[str, list[str]]]:
    for family in ("ip", "ip6"):
        chosen = [n for n in networks if _family(n) == family]
        if chosen:
            yield family, chosen


def _reject(match: str, comment: str) -> list[str]:
    return [
        f'    {match} meta l4proto tcp counter reject with tcp reset comment "{comment}"',
        f'    {match} counter reject comment "{comment}"',
    ]


def _accept(destinations: Iterable[AllowedDestination], who: str, comment: str) -> list[str]:
    lines = []
    for item in destinations:
        family = "ip6" if item.network.version == 6 else "ip"
        match = f"{who}{family} daddr {item.network}"
        if item.port is not None:
            match += f" meta l4proto {{ tcp, udp }} th dport {item.port}"
        lines.append(f'    {match} counter accept comment "{comment}"')
    return lines


def firewall_ruleset(
    uids: UidRange,
    allowed_ports: list[int],
    blocked_networks: list[str],
    *,
    allowed: dict[str, list[AllowedDestination]] | None = None,
    resolvers: list[str] | None = None,
) -> str:
    """The nft script that (re)creates the range's table in one transaction.

    ``allowed`` maps ``"all"`` and VM types (``"cli"``, ``"browser"``) to the destinations
    re-opened for them; ``resolvers`` are the host's nameservers (port 53 passes)."""
    allowed = allowed or {}
    table = f"inet {table_name(uids)}"
    lines = [
        f"add table {table}",
        f"delete table {table}",
        f"table {table} {{",
        "  chain output {",
        "    type filter hook output priority filter; policy accept;",
        f"    meta skuid != {uids.nft} return",
        "    ct state established,related accept",
        f'    oifname "lo" meta l4proto {{ tcp, udp }} th dport {DNS_PORT} accept comment "host DNS resolver"',
    ]
    if allowed_ports:
        ports = ", ".join(str(port) for port in allowed_ports)
        lines.append(f'    oifname "lo" tcp dport {{ {ports} }} accept comment "guest_host_allowed_ports"')
    lines += _reject('oifname "lo"', "host services")
    for family, addresses in _split_families(resolvers or []):
        lines.append(f"    {family} daddr {{ {', '.join(addresses)} }} meta l4proto {{ tcp, udp }} "
                     f'th dport {DNS_PORT} accept comment "host DNS resolver"')
    for family, networks in _split_families(blocked_networks):
        lines += _reject(f"{family} daddr {{ {', '.join(networks)} }}", "guest_blocked_networks")
    lines += _accept(allowed.get("all", []), "", "guest_allowed_networks")
    for vm_type in VM_TYPES_ORDER:
        part = uids.for_type(vm_type)
        lines += _accept(allowed.get(vm_type, []), f"meta skuid {part.nft} ", f"guest_allowed_networks_{vm_type}")
    lines += _reject(f"ip daddr {{ {', '.join(PRIVATE_IPV4)} }}", "private networks")
    lines += _reject(f"ip6 daddr {{ {', '.join(PRIVATE_IPV6)} }}", "private networks")
    lines += ["  }", "}", ""]
    return "\n".join(lines)


def _allowed(settings: Settings) -> dict[str, list[AllowedDestination]]:
    return {
        "all": [parse_allowed_destination(item) for item in settings.guest_allowed_networks],
        "cli": [parse_allowed_destination(item) for item in settings.guest_allowed_networks_cli],
        "browser": [parse_allowed_destination(item) for item in settings.guest_allowed_networks_browser],
    }


def settings_ruleset(settings: Settings, uids: UidRange) -> str:
    return firewall_ruleset(
        uids, settings.guest_host_allowed_ports, settings.guest_blocked_networks,
        allowed=_allowed(settings), resolvers=host_resolvers(),
    )


def apply_firewall(script: str) -> None:
    """Install or replace a table. Raises DriverUnavailable with the reason when it cannot."""
    nft = shutil.which("nft")
    if nft is None:
        raise DriverUnavailable("nft is not installed (Debian package nftables).")
    result = subprocess.run([nft, "-f", "-"], input=script, capture_output=True, text=True, check=False, timeout=30)
    if result.returncode != 0:
        raise DriverUnavailable(f"nft refused the guest firewall rules: {result.stderr.strip()[:300]}")


def firewall_present(uids: UidRange) -> bool:
    """Is the range's table loaded (e.g. not flushed by an nftables restart)?

    Only a clear "no such table" answers False: any other failure of ``nft list`` (say, a
    concurrent ruleset change) answers True, so that a repair never replaces rules on a guess.
    """
    nft = shutil.which("nft")
    if nft is None:
        return False
    try:
        result = subprocess.run(
            [nft, "list", "table", "inet", table_name(uids)], capture_output=True, text=True, check=False, timeout=30
        )
    except (OSError, subprocess.TimeoutExpired):
        return True
    if result.returncode == 0:
        return True
    return "No such file or directory" not in result.stderr


def remove_firewall(uids: UidRange) -> None:
    """Delete the range's table (tests, uninstall). Absent table: nothing to do."""
    nft = shutil.which("nft")
    if nft is not None:
        subprocess.run(
            [nft, "delete", "table", "inet", table_name(uids)], capture_output=True, check=False, timeout=30
        )


def _accounts_in(uids: UidRange) -> str | None:
    """An existing user or group whose id falls in the range (those would share a QEMU's id)."""
    for user in pwd.getpwall():
        if user.pw_uid in uids:
            return f"user {user.pw_name} ({user.pw_uid})"
    for group in grp.getgrall():
        if group.gr_gid in uids:
            return f"group {group.gr_name} ({group.gr_gid})"
    return None


def _cannot_switch_user(settings: Settings) -> str | None:
    """Why QEMU cannot run as uids of its own here, or None when it can."""
    if os.geteuid() != 0:
        return "the controller is not root, so QEMU runs as its user and guests can reach the host's loopback"
    uids = uid_range(settings)
    if uids is None:
        return "qemu_uid_range is empty, so QEMU runs as root"
    taken = _accounts_in(uids)
    if taken is not None:
        return f"qemu_uid_range {uids.nft} holds the existing {taken}; choose a range no account uses"
    return None


def egress_policy(settings: Settings) -> str:
    """The effective egress policy in one line (``up``, ``doctor``)."""
    if settings.guest_network_isolation == "off":
        return "guest egress: unrestricted (guest_network_isolation=off): guests reach the host and every network"

    def listed(items: list[str]) -> str:
        return ", ".join(items) or "none"

    ports = ", ".join(str(port) for port in settings.guest_host_allowed_ports)
    host = f"the host (except DNS and ports {ports})" if ports else "the host (except DNS)"
    return (
        f"guest egress: public Internet only; refused: {host}, private and special ranges "
        f"({', '.join(PRIVATE_IPV4)}; IPv6 {', '.join(PRIVATE_IPV6)}) "
        f"and guest_blocked_networks ({listed(settings.guest_blocked_networks)}); re-opened: all guests "
        f"{listed(settings.guest_allowed_networks)}, CLI VMs {listed(settings.guest_allowed_networks_cli)}, "
        f"Browser VMs {listed(settings.guest_allowed_networks_browser)}"
    )


def _confined_detail(uids: UidRange) -> str:
    return (f"each QEMU runs as a uid of its own from {uids.nft}; guests reach neither the host nor private "
            "networks")


def confine(settings: Settings) -> Confinement:
    """Check QEMU's uid range and (re)install the firewall, as the settings ask (see module docstring)."""
    mode = settings.guest_network_isolation
    reason = _cannot_switch_user(settings)
    uids = uid_range(settings) if reason is None else None
    if mode == "off" or uids is None:
        if mode == "off" and uids is not None:
            remove_firewall(uids)  # the operator turned it off: rules from earlier runs go too
        if mode == "on":
            raise DriverUnavailable(f"guest_network_isolation is 'on' but {reason}.")
        who = f"each QEMU runs as a uid of its own from {uids.nft}" if uids else reason
        return Confinement(uids=uids, firewall=False, detail=f"{who}; guest network isolation off")
    try:
        apply_firewall(settings_ruleset(settings, uids))
    except DriverUnavailable as exc:
        if mode == "on":
            raise DriverUnavailable(f"guest_network_isolation is 'on' but {exc.message}") from None
        return Confinement(
            uids=uids, firewall=False,
            detail=f"each QEMU runs as a uid of its own from {uids.nft}; guest network isolation off: {exc.message}",
        )
    return Confinement(uids=uids, firewall=True, detail=_confined_detail(uids))


def inspect(settings: Settings) -> Confinement:
    """What is in force now, changing nothing (for ``doctor``): QEMU's uid range and whether its
    table is loaded. ``firewall`` False with a reason when it is not."""
    mode = settings.guest_network_isolation
    reason = _cannot_switch_user(settings)
    uids = uid_range(settings)
    if reason is not None or uids is None:
        return Confinement(None, False, reason or "qemu_uid_range is empty")
    if mode == "off":
        return Confinement(uids, False, f"each QEMU runs as a uid of its own from {uids.nft}; "
                                        "guest network isolation off")
    if not firewall_present(uids):
        return Confinement(uids, False, f"each QEMU runs as a uid of its own from {uids.nft}; the guest firewall "
                                        f"table {table_name(uids)} is not loaded (restored at the next VM boot, "
                                        "reconciler pass or 'remotecli up')")
    return Confinement(uids, True, _confined_detail(uids))


# ------------------------------------------------------------------------------------------------
# One uid per VM


def _read_uid(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def _process_uid(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("Uid:"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def qemu_process_uids(exclude_directory: Path | None = None) -> set[int]:
    """The real uids of every running QEMU, except those whose command line names ``exclude_directory``."""
    marker = f"{exclude_directory}/" if exclude_directory is not None else None
    found: set[int] = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            raw = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        argv = [part.decode("utf-8", errors="replace") for part in raw.split(b"\x00") if part]
        if not argv or "qemu-system" not in Path(argv[0]).name:
            continue
        if marker is not None and any(marker in arg for arg in argv):
            continue
        uid = _process_uid(int(entry.name))
        if uid is not None:
            found.add(uid)
    return found


def _last_handed_out(lock: Path) -> dict[str, int]:
    """The lock file also remembers the last uid handed out per VM type ("cli 1900000003" lines)."""
    handed: dict[str, int] = {}
    with contextlib.suppress(OSError):
        for line in lock.read_text().splitlines():
            kind, _, number = line.partition(" ")
            if number.strip().isdigit():
                handed[kind] = int(number)
    return handed


@contextlib.contextmanager
def _uid_lock(vms_dir: Path) -> Iterator[Path]:
    vms_dir.mkdir(parents=True, exist_ok=True)
    lock = vms_dir / UID_LOCK
    fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield lock
    finally:
        os.close(fd)  # closing releases the lock


def allocate_uid(vms_dir: Path, directory: Path, vm_type: str, uids: UidRange) -> QemuUser:
    """The uid the VM in ``directory`` runs its QEMU as: the one it had (recorded in
    ``<directory>/qemu.uid``) while no other VM has it, else the next free one of its type's half
    of the range after the last one handed out (so a freed uid is not reused at once).

    Free means: recorded by no other VM directory under ``vms_dir`` (VMs keep their uid while their
    directory exists, stopped or not) and used by no running QEMU of another VM (a stray process
    whose directory is gone). Serialised by a lock file in ``vms_dir``, so concurrent boots, also
    from several controllers on this host, never pick the same uid.
    """
    part = uids.for_type(vm_type)
    with _uid_lock(vms_dir) as lock:
        taken: set[int] = set()
        if vms_dir.is_dir():
            for other in vms_dir.iterdir():
                if other.is_dir() and other.name != directory.name:
                    recorded = _read_uid(other / UID_FILE)
                    if recorded is not None:
                        taken.add(recorded)
        taken |= qemu_process_uids(exclude_directory=directory)
        own = _read_uid(directory / UID_FILE)
        if own is not None and own in part and own not in taken:
            return QemuUser(own, own)
        handed = _last_handed_out(lock)
        last = handed.get(vm_type)
        start = last + 1 if last is not None and last in part else part.first
        size = part.last - part.first + 1
        for step in range(size):
            candidate = part.first + (start - part.first + step) % size
            if candidate not in taken:
                break
        else:
            raise DriverUnavailable(
                f"Every QEMU uid of {part.nft} ({vm_type} VMs) is in use; widen qemu_uid_range."
            )
        tmp = directory / f".{UID_FILE}.tmp"
        tmp.write_text(f"{candidate}\n")
        os.chmod(tmp, 0o600)
        os.replace(tmp, directory / UID_FILE)
        handed[vm_type] = candidate
        lock.write_text("".join(f"{kind} {uid}\n" for kind, uid in sorted(handed.items())))
        return QemuUser(candidate, candidate)


@functools.cache
def supports_run_with(qemu_binary: str) -> bool:
    """QEMU 9+ spells the privilege drop ``-run-with user=``; older ones ``-runas``."""
    try:
        result = subprocess.run([qemu_binary, "-help"], capture_output=True, text=True, check=False, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return "-run-with" in result.stdout


def runas_args(qemu_binary: str, user: QemuUser | None) -> list[str]:
    """Both spellings take ``uid:gid`` (no passwd entry needed)."""
    if user is None:
        return []
    if supports_run_with(qemu_binary):
        return ["-run-with", f"user={user.name}"]
    return ["-runas", user.name]
