"""Run the local OpenID Connect provider in ``tests/support/idp`` (node + oidc-provider) for a test.

::

    with run_idp(password="pw") as idp:
        idp.url, idp.issuer, idp.port, idp.clients["codex"], idp.discovery["token_endpoint"]

    # the dashboard's single sign-on client, with the controller's callback URL:
    with run_idp(dashboard_redirect_uris=["http://127.0.0.1:8123/auth/oidc/callback"]) as idp: ...

``npm ci`` (or ``npm install`` without a lock file) runs once when ``node_modules`` is missing. The
IdP listens on 127.0.0.1 only. See ``idp/idp.mjs`` for the clients, accounts and pages.

With ``tls=(cert_pem, key_pem)`` it also serves HTTPS on ``idp.tls_port`` (a certificate for the real
providers' hosts, see ``guest_redirect.py``); ``idp.events("grant")`` lists the JSON records it
logged (token grants with a digest of the refresh token used, device-code steps, TLS connections).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

IDP_DIR = Path(__file__).resolve().parent / "idp"

CLIENT_IDS = {
    "claude_code": "remotecli-claude-code",
    "codex": "remotecli-codex",
    "gemini": "remotecli-gemini",
}
GEMINI_CLIENT_SECRET = "remotecli-gemini-test-secret"
# The dashboard's single sign-on client (a confidential web client; redirect URIs given to run_idp).
DASHBOARD_CLIENT_ID = "remotecli-dashboard"
DASHBOARD_CLIENT_SECRET = "remotecli-dashboard-test-secret"


class IdpUnavailable(RuntimeError):
    """node/npm missing, or the IdP did not start."""


@dataclass
class Idp:
    url: str
    issuer: str
    port: int
    password: str
    process: subprocess.Popen[bytes]
    discovery: dict[str, Any]
    clients: dict[str, str] = field(default_factory=lambda: dict(CLIENT_IDS))
    gemini_client_secret: str = GEMINI_CLIENT_SECRET
    log_lines: list[str] = field(default_factory=list)
    tls_port: int | None = None

    @property
    def authorize_url(self) -> str:
        return str(self.discovery["authorization_endpoint"])

    @property
    def token_url(self) -> str:
        return str(self.discovery["token_endpoint"])

    def logs(self) -> str:
        return "\n".join(self.log_lines)

    def events(self, kind: str | None = None) -> list[dict[str, Any]]:
        """The JSON records the IdP logged (``kind``: only those with that ``event``)."""
        out: list[dict[str, Any]] = []
        for line in list(self.log_lines):
            if not line.startswith("{"):
                continue
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict) and (kind is None or record.get("event") == kind):
                out.append(record)
        return out


def token_digest(token: str) -> str:
    """What the IdP logs for a refresh token it was given (``refresh_token_sha256``)."""
    return hashlib.sha256(token.encode()).hexdigest()[:16]


def ensure_node_modules() -> None:
    """``npm ci`` / ``npm install`` once, under a lock (parallel test processes)."""
    if (IDP_DIR / "node_modules" / "oidc-provider").is_dir():
        return
    npm = shutil.which("npm")
    if npm is None:
        raise IdpUnavailable("npm is not installed (Debian package npm)")
    with open(Path(tempfile.gettempdir()) / "remotecli-test-idp-npm.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (IDP_DIR / "node_modules" / "oidc-provider").is_dir():
            return
        verb = "ci" if (IDP_DIR / "package-lock.json").exists() else "install"
        result = subprocess.run(
            [npm, verb, "--no-audit", "--no-fund", "--loglevel=error"],
            cwd=IDP_DIR,
            capture_output=True,
            timeout=300,
            check=False,
        )
        if result.returncode != 0:
            raise IdpUnavailable(f"npm {verb} failed: {result.stderr.decode(errors='replace')[-2000:]}")


@contextlib.contextmanager
def run_idp(
    port: int = 0,
    issuer: str | None = None,
    password: str = "correct horse battery staple",
    *,
    planted_access_token: str | None = None,
    planted_refresh_token: str | None = None,
    dashboard_redirect_uris: list[str] | None = None,
    tls: tuple[Path, Path] | None = None,
    tls_port: int = 0,
    start_timeout: float = 30.0,
) -> Iterator[Idp]:
    node = shutil.which("node")
    if node is None:
        raise IdpUnavailable("node is not installed (Debian package nodejs)")
    ensure_node_modules()
    argv = [node, str(IDP_DIR / "idp.mjs"), "--port", str(port), "--password", password]
    if issuer:
        argv += ["--issuer", issuer]
    if planted_access_token:
        argv += ["--planted-access-token", planted_access_token]
    if planted_refresh_token:
        argv += ["--planted-refresh-token", planted_refresh_token]
    for uri in dashboard_redirect_uris or []:
        argv += ["--dashboard-redirect-uri", uri]
    if tls is not None:
        argv += ["--tls-port", str(tls_port), "--tls-cert", str(tls[0]), "--tls-key", str(tls[1])]
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "NODE_ENV": "test", "HOME": tempfile.gettempdir()}
    process = subprocess.Popen(
        argv,
        cwd=IDP_DIR,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    lines: list[str] = []
    ready = threading.Event()
    info: dict[str, Any] = {}

    def pump_stdout() -> None:
        assert process.stdout is not None
        for raw in process.stdout:
            line = raw.decode("utf-8", "replace").rstrip("\n")
            lines.append(line)
            with contextlib.suppress(ValueError):
                record = json.loads(line)
                if isinstance(record, dict) and record.get("event") == "listening":
                    info.update(record)
                    ready.set()

    def pump_stderr() -> None:
        assert process.stderr is not None
        for raw in process.stderr:
            lines.append(raw.decode("utf-8", "replace").rstrip("\n"))

    threading.Thread(target=pump_stdout, daemon=True).start()
    threading.Thread(target=pump_stderr, daemon=True).start()
    try:
        end = time.monotonic() + start_timeout
        while not ready.wait(0.1):
            if process.poll() is not None or time.monotonic() > end:
                raise IdpUnavailable("the IdP did not start:\n" + "\n".join(lines))
        bound_port = int(info["port"])
        url = f"http://127.0.0.1:{bound_port}"
        discovery = _discovery(url, end)
        yield Idp(
            url=url,
            issuer=str(info["issuer"]),
            port=bound_port,
            password=password,
            process=process,
            discovery=discovery,
            log_lines=lines,
            tls_port=int(info["tls_port"]) if info.get("tls_port") else None,
        )
    finally:
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(5)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait(5)


def _discovery(url: str, deadline: float) -> dict[str, Any]:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            with opener.open(f"{url}/.well-known/openid-configuration", timeout=5) as answer:
                doc = json.loads(answer.read())
                if isinstance(doc, dict):
                    return doc
        except (OSError, ValueError) as exc:
            last = exc
        time.sleep(0.1)
    raise IdpUnavailable(f"no discovery document at {url}: {last}")
