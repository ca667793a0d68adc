"""Requests that carry ``X-Forwarded-For`` from a peer that is not a trusted proxy.

uvicorn honours ``X-Forwarded-For`` only from ``REMOTECLI_TRUSTED_PROXIES`` (none by default) and
ignores it otherwise. Behind a reverse proxy on the same host without that setting, every client
then has the proxy's address (127.0.0.1): the per-address sign-in limit (services/login_limits.py)
counts them all together, and one client's failed passwords lock every password sign-in out.
The header arriving from an untrusted peer is how that misconfiguration shows, so the controller
warns in its log (at most once an hour per peer) and records the peer in
``<data_dir>/untrusted-forwarders.json``, which ``remotecli doctor`` reads (check ``reverse proxy``).

Ignored means: the peer (the socket's address, or what uvicorn put there for a trusted proxy) is
not one of the header's hops. When uvicorn applied the header (a trusted proxy), the client
address it set *is* a hop, so no warning.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import os
import threading
import time
from pathlib import Path

from remotecli.config import Settings
from remotecli.logging import get_logger

log = get_logger("proxy")

MARKER = "untrusted-forwarders.json"
WARN_EVERY_S = 3600.0
DOCTOR_WINDOW = dt.timedelta(days=7)
_MAX_PEERS = 256
_warned: dict[str, float] = {}
_lock = threading.Lock()


def forwarded_ignored(peer: str | None, forwarded_for: str | None) -> bool:
    """Did this request carry an ``X-Forwarded-For`` that was not applied?"""
    if not peer or not forwarded_for:
        return False
    hops = [hop.strip() for hop in forwarded_for.split(",") if hop.strip()]
    return bool(hops) and peer not in hops


def is_trusted(settings: Settings, peer: str) -> bool:
    """Is ``peer`` covered by REMOTECLI_TRUSTED_PROXIES (addresses, networks or ``*``)?"""
    for item in (part.strip() for part in settings.trusted_proxies.split(",")):
        if not item:
            continue
        if item == "*" or item == peer:
            return True
        try:
            if ipaddress.ip_address(peer) in ipaddress.ip_network(item, strict=False):
                return True
        except ValueError:
            continue
    return False


def note_request(settings: Settings, peer: str | None, forwarded_for: str | None) -> bool:
    """Warn (rate-limited) and record the peer when the request's header was ignored. True if so."""
    if not forwarded_ignored(peer, forwarded_for):
        return False
    assert peer is not None
    now = time.monotonic()
    with _lock:
        last = _warned.get(peer)
        if last is not None and now - last < WARN_EVERY_S:
            return True
        if len(_warned) >= _MAX_PEERS:
            _warned.clear()
        _warned[peer] = now
    log.warning(
        "A request from %s carries X-Forwarded-For, but %s is not in REMOTECLI_TRUSTED_PROXIES: the header "
        "is ignored, so every client behind that proxy shares the address %s (one of them can lock out all "
        "password sign-ins from there). Set REMOTECLI_TRUSTED_PROXIES=%s if it is your reverse proxy.",
        peer, peer, peer, peer,
    )
    _record(settings, peer)
    return True


def _marker(settings: Settings) -> Path:
    return settings.data_dir / MARKER


def _read(settings: Settings) -> dict[str, str]:
    try:
        data = json.loads(_marker(settings).read_text())
    except (OSError, ValueError):
        return {}
    return {str(k): str(v) for k, v in data.items()} if isinstance(data, dict) else {}


def _record(settings: Settings, peer: str) -> None:
    seen = _read(settings)
    seen[peer] = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    newest = dict(sorted(seen.items(), key=lambda item: item[1], reverse=True)[:20])
    path = _marker(settings)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps(newest, indent=1) + "\n")
        os.replace(tmp, path)
    except OSError:
        log.exception("could not record the untrusted forwarder")


def doctor_check(settings: Settings) -> tuple[str, bool, str]:
    """``remotecli doctor``'s ``reverse proxy`` line."""
    since = dt.datetime.now(dt.UTC) - DOCTOR_WINDOW
    recent: list[tuple[str, str]] = []
    for peer, when in _read(settings).items():
        try:
            seen = dt.datetime.fromisoformat(when)
        except ValueError:
            continue
        if seen >= since and not is_trusted(settings, peer):
            recent.append((peer, when))
    if recent:
        peers = ", ".join(f"{peer} (last {when})" for peer, when in sorted(recent))
        return ("reverse proxy", False,
                f"requests carried X-Forwarded-For from {peers}, not in REMOTECLI_TRUSTED_PROXIES: the header is "
                "ignored and all clients behind it share one address for the sign-in limit; set "
                "REMOTECLI_TRUSTED_PROXIES to your proxy's address (docs/security.md)")
    trusted = settings.trusted_proxies.strip()
    return ("reverse proxy", True,
            f"X-Forwarded-For honoured from {trusted}" if trusted
            else "no X-Forwarded-For seen from an untrusted peer (none trusted: REMOTECLI_TRUSTED_PROXIES unset)")
