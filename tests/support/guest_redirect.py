"""Point a real CLI's own provider endpoints at the test IdP, inside one guest only.

The CLIs in the ``cli`` image call their providers' fixed hosts (``platform.claude.com``,
``auth.openai.com``, ``oauth2.googleapis.com``, ...). A test that lets the real CLI refresh, or
sign in by device code, redirects those hosts inside the CLI VM, never on the host:

1. **Nothing else can leave the guest.** The guest's default route is removed, so it reaches only
   QEMU's user-mode network (10.0.2.2, the host's loopback, where the controller's confinement lets
   it use only ``guest_host_allowed_ports``; 10.0.2.3, QEMU's DNS). A CLI that tries any real
   provider address gets "network unreachable".
2. **A hosts entry plus a destination rewrite.** ``/etc/hosts`` maps every provider host the CLIs
   use to 127.0.0.1, and a small TCP forwarder (python3, run as root through the guest agent; the
   image has no nft or iptables, see the module note below) listens on the guest's 127.0.0.1:443 and
   sends every connection to the IdP's HTTPS port on the host (10.0.2.2:<tls_port>).
3. **TLS from a test CA.** :func:`make_test_ca` makes a CA (in the test's temp dir) and a server
   certificate for the token hosts signed by it; the IdP serves HTTPS with it
   (``run_idp(tls=...)``). The CA is appended to the guest's system bundle (Codex's rustls takes
   the system roots) and given to Node/Bun CLIs as ``NODE_EXTRA_CA_CERTS`` (and ``SSL_CERT_FILE``).

The IdP logs each TLS connection's server name and each grant with the Host it was aimed at, so a
test asserts that the CLI's connection was caught (``idp.events("grant")``).

Why not nftables: the ``cli`` image carries neither nft nor iptables (adding one is a recipe change
and a rebuild of every user's image for a test-only need); the route removal plus the hosts entry
and the loopback forwarder give the same guarantee for the CLI's traffic, and more for everything
else (no other destination is reachable at all).
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json
import secrets
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from remotecli.agent.protocol import ExecResult, GuestAgent
from remotecli.context import AppContext
from remotecli.db.models import Vm

__all__ = [
    "REDIRECTED_HOSTS",
    "TOKEN_HOSTS",
    "GuestRedirect",
    "TestCa",
    "headless_tokens",
    "install_redirect",
    "make_test_ca",
]

#: The token hosts the test CA's server certificate covers (the IdP answers for them).
TOKEN_HOSTS = ("platform.claude.com", "auth.openai.com", "oauth2.googleapis.com")
#: Every host mapped to the guest's loopback: the token hosts and the providers' other hosts the
#: CLIs call at start (profile, telemetry, model APIs). Those others end in a TLS error at the IdP.
REDIRECTED_HOSTS = (
    *TOKEN_HOSTS,
    "api.anthropic.com", "claude.ai", "claude.com", "console.anthropic.com", "statsig.anthropic.com",
    "mcp-proxy.anthropic.com", "downloads.claude.ai",
    "chatgpt.com", "api.openai.com", "ab.chatgpt.com",
    "accounts.google.com", "www.googleapis.com", "cloudcode-pa.googleapis.com",
    "generativelanguage.googleapis.com", "play.googleapis.com", "storage.googleapis.com",
)
GUEST_CA_PATH = "/usr/local/share/ca-certificates/remotecli-test-ca.crt"
_FORWARDER_PATH = "/usr/local/lib/remotecli-test-forwarder.py"
_FORWARDER_LOG = "/var/log/remotecli-test-forwarder.log"
_FORWARDER_PID = "/run/remotecli-test-forwarder.pid"

# The forwarder: 127.0.0.1:443 in the guest -> the IdP's HTTPS port on the host.
_FORWARDER = r'''
import os, socket, sys, threading, time
target = (sys.argv[1], int(sys.argv[2]))
with open(sys.argv[3], "w") as pidfile:
    pidfile.write(str(os.getpid()))
listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
listener.bind(("127.0.0.1", 443))
listener.listen(64)
def pump(a, b):
    try:
        while True:
            data = a.recv(65536)
            if not data:
                break
            b.sendall(data)
    except OSError:
        pass
    finally:
        for s in (a, b):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
def serve(client):
    try:
        upstream = socket.create_connection(target, timeout=10)
        upstream.settimeout(None)
    except OSError as exc:
        print(f"{time.time():.3f} upstream failed: {exc}", flush=True)
        client.close()
        return
    print(f"{time.time():.3f} forwarded a connection", flush=True)
    threading.Thread(target=pump, args=(client, upstream), daemon=True).start()
    pump(upstream, client)
print("listening", flush=True)
while True:
    conn, _ = listener.accept()
    threading.Thread(target=serve, args=(conn,), daemon=True).start()
'''


@dataclass(frozen=True)
class TestCa:
    ca_pem: bytes
    cert_path: Path  # the IdP's server certificate (PEM)
    key_path: Path  # its private key (PEM)


def make_test_ca(directory: Path, hosts: tuple[str, ...] = TOKEN_HOSTS) -> TestCa:
    """A CA for this test only, and a server certificate for ``hosts`` signed by it."""
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "remotecli test CA (tests only)")])
    ca_cert = (
        x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
        .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1)).not_valid_after(now + dt.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                     crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1)).not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(h) for h in hosts]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    directory.mkdir(parents=True, exist_ok=True)
    cert_path = directory / "idp-cert.pem"
    key_path = directory / "idp-key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    key_path.chmod(0o600)
    return TestCa(ca_pem=ca_cert.public_bytes(serialization.Encoding.PEM), cert_path=cert_path, key_path=key_path)


def headless_tokens(idp_url: str, *, client_id: str, redirect_uri: str, scope: str, user: str, password: str,
                    client_secret: str | None = None, json_body: bool = False) -> dict[str, Any]:
    """An authorization-code sign-in at the test IdP without a browser (its login and consent forms
    are plain HTML forms), for tests where the browser sign-in itself is proven elsewhere
    (tests/e2e/test_auth_real_vms.py). Returns the token response with ``obtained_at``."""
    verifier = secrets.token_urlsafe(48)
    challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
    state = secrets.token_urlsafe(16)
    params = {"client_id": client_id, "response_type": "code", "redirect_uri": redirect_uri, "scope": scope,
              "state": state, "code_challenge": challenge, "code_challenge_method": "S256", "prompt": "consent"}
    with httpx.Client(base_url=idp_url, timeout=30, trust_env=False) as http:
        answer = http.get("/auth", params=params)
        for _ in range(10):
            if answer.status_code in (302, 303):
                location = answer.headers["location"]
                target = urllib.parse.urlparse(location)
                if target.path == urllib.parse.urlparse(redirect_uri).path and target.hostname != "":
                    break
                answer = http.get(location)
                continue
            path = urllib.parse.urlparse(str(answer.url)).path
            if "Sign in" in answer.text:
                answer = http.post(f"{path}/login", data={"username": user, "password": password})
            elif "Authorize" in answer.text:
                answer = http.post(f"{path}/confirm", data={"decision": "allow"})
            else:
                raise AssertionError(f"unexpected IdP page: {answer.status_code} {answer.text[:500]}")
        query = urllib.parse.parse_qs(urllib.parse.urlparse(answer.headers["location"]).query)
        assert query.get("state") == [state], query
        code = query["code"][0]
        form = {"grant_type": "authorization_code", "code": code, "redirect_uri": redirect_uri,
                "client_id": client_id, "code_verifier": verifier}
        if client_secret:
            form["client_secret"] = client_secret
        token = http.post("/token", json={**form, "state": state}) if json_body else http.post("/token", data=form)
        assert token.status_code == 200, token.text
        doc: dict[str, Any] = token.json()
    doc["obtained_at"] = time.time()
    return doc


class GuestRedirect:
    """The redirect installed in one CLI VM (see the module docstring)."""

    def __init__(self, ctx: AppContext, vm: Vm, ca_pem: bytes) -> None:
        self.ctx = ctx
        self.vm = vm
        self.ca_pem = ca_pem

    def _agent(self) -> GuestAgent:
        return self.ctx.agent(self.vm, timeout=400)

    def root(self, argv: list[str], timeout_s: float = 60) -> ExecResult:
        agent = self._agent()
        try:
            return agent.exec(argv, timeout_s=timeout_s)
        finally:
            agent.close()

    def run_cli(self, argv: list[str], *, env: dict[str, str] | None = None,
                timeout_s: float = 300) -> tuple[int, str]:
        """Run ``argv`` as the CLI user with a clean environment that trusts the test CA; returns
        the exit code and stdout+stderr."""
        user = self.ctx.settings.cli_guest_user
        home = self.ctx.settings.cli_guest_home.rstrip("/")
        pairs = {"HOME": home, "USER": user, "LOGNAME": user, "TERM": "dumb", "NO_COLOR": "1",
                 "PATH": "/usr/local/bin:/usr/bin:/bin", "NODE_EXTRA_CA_CERTS": GUEST_CA_PATH,
                 "SSL_CERT_FILE": "/etc/ssl/certs/ca-certificates.crt", **(env or {})}
        command = ["runuser", "-u", user, "--", "env", "-i", *[f"{k}={v}" for k, v in pairs.items()], *argv]
        agent = self._agent()
        try:
            result = agent.exec(command, timeout_s=timeout_s, cwd=home)
        finally:
            agent.close()
        output = result.stdout.decode("utf-8", "replace") + result.stderr.decode("utf-8", "replace")
        if result.timed_out:
            raise AssertionError(f"{' '.join(argv)} timed out after {timeout_s:g} s:\n{output[-3000:]}")
        return result.exit_code, output

    def read_json(self, path: str) -> dict[str, Any]:
        agent = self._agent()
        try:
            doc = json.loads(agent.read_file(path).data)
        finally:
            agent.close()
        assert isinstance(doc, dict)
        return doc

    def forwarder_log(self) -> str:
        return self.root(["cat", _FORWARDER_LOG]).stdout.decode("utf-8", "replace")


def install_redirect(ctx: AppContext, vm: Vm, *, idp_tls_port: int, ca_pem: bytes) -> GuestRedirect:
    """Install the redirect (module docstring) in the CLI VM ``vm``; idempotent."""
    redirect = GuestRedirect(ctx, vm, ca_pem)
    hosts = "# remotecli-test-redirect\n" + "".join(f"127.0.0.1 {h}\n" for h in REDIRECTED_HOSTS)
    agent = redirect._agent()
    try:
        agent.write_file(GUEST_CA_PATH, ca_pem, mode=0o644, owner="root")
        agent.write_file("/etc/remotecli-test-hosts", hosts.encode(), mode=0o644, owner="root")
        agent.write_file(_FORWARDER_PATH, _FORWARDER.encode(), mode=0o755, owner="root")
    finally:
        agent.close()

    def step(what: str, script: str, timeout_s: float = 60) -> None:
        result = redirect.root(["sh", "-c", script], timeout_s=timeout_s)
        if result.exit_code != 0 or result.timed_out:
            log = redirect.root(["sh", "-c", f"cat {_FORWARDER_LOG} 2>&1; ip route; ss -ltn 2>&1 | head"]).stdout
            raise AssertionError(f"guest redirect: {what} failed ({result.exit_code}, timed out: {result.timed_out}): "
                                 f"{(result.stdout + result.stderr).decode('utf-8', 'replace')[-2000:]}\n"
                                 f"{log.decode('utf-8', 'replace')[-2000:]}")

    # The providers' hosts -> loopback, and the test CA in the system bundle (Codex's rustls, curl).
    step("hosts and CA", (
        "grep -q remotecli-test-redirect /etc/hosts || cat /etc/remotecli-test-hosts >> /etc/hosts; "
        f"grep -q \"$(sed -n 2p {GUEST_CA_PATH})\" /etc/ssl/certs/ca-certificates.crt || "
        f"cat {GUEST_CA_PATH} >> /etc/ssl/certs/ca-certificates.crt"))
    # The forwarder on 127.0.0.1:443, detached (its own session, no inherited descriptors).
    step("starting the forwarder", (
        # (not pgrep -f: it would find this very shell, whose command line names the script)
        f"kill -0 \"$(cat {_FORWARDER_PID} 2>/dev/null)\" 2>/dev/null || "
        f"setsid -f python3 {_FORWARDER_PATH} 10.0.2.2 {idp_tls_port} {_FORWARDER_PID} "
        f"</dev/null >>{_FORWARDER_LOG} 2>&1"))
    step("waiting for the forwarder", (
        "exec python3 -c 'import socket, time\n"
        "for _ in range(200):\n"
        "    try:\n"
        "        socket.create_connection((\"127.0.0.1\", 443), 1).close(); break\n"
        "    except OSError:\n"
        "        time.sleep(0.25)\n"
        "else:\n"
        "    raise SystemExit(1)'"), timeout_s=120)
    # Last: no default route, so only QEMU's own network (10.0.2.0/24) stays reachable.
    step("removing the default route",
         "ip route del default 2>/dev/null || true; ! ip route get 1.1.1.1 >/dev/null 2>&1")
    return redirect
