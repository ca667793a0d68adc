"""Refresh proven: the refresh token remotecli delivers works for the real CLI, for all three CLIs.

One CLI VM (real QEMU guest) for the module. Inside it only, the CLIs' own token endpoints are
redirected to the test IdP (tests/support/guest_redirect.py: no default route, a hosts entry for
the providers' hosts, a loopback forwarder to the IdP's HTTPS port, a test CA in the guest's trust);
Codex's through its own ``CODEX_REFRESH_TOKEN_URL_OVERRIDE``. The credentials come from the IdP
(an authorization-code sign-in under each CLI's real client id, done without a browser since the
browser sign-in is proven in test_auth_real_vms.py) and are written by the project's own delivery
writer (``render_credentials`` + the delivery's write-and-read-back), with the access token already
expired. Then the real CLI runs a command that needs a token: it refreshes with the delivered
refresh token (the IdP logs the grant with a digest of the refresh token it was given, and the Host
the CLI aimed at), writes the new tokens back into its file, and still says it is signed in
(the offline verdict of tests/support/cli_judge.py).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from remotecli.context import AppContext
from remotecli.db.models import Vm, utcnow
from remotecli.profiles import ProviderProfile, load_profiles
from remotecli.services import credentials, vm_manager
from remotecli.services import users as users_service
from remotecli.services.providers import render_credentials
from remotecli.services.users import Principal
from tests.integration.conftest import close_and_clean, qemu_settings, require_images
from tests.support.cli_judge import assert_cli_signed_in
from tests.support.guest_redirect import GuestRedirect, headless_tokens, install_redirect, make_test_ca
from tests.support.idp_server import Idp, run_idp, token_digest
from tests.support.server import free_port

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.integration]

PASSWORD = "refresh-test-password"


@dataclass
class World:
    ctx: AppContext
    idp: Idp
    vm: Vm
    guest: GuestRedirect
    profiles: dict[str, ProviderProfile]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    tmp = tmp_path_factory.mktemp("refresh")
    ca = make_test_ca(tmp / "ca")
    port = free_port()
    with run_idp(port=port, issuer=f"http://10.0.2.2:{port}", password=PASSWORD,
                 tls=(ca.cert_path, ca.key_path), tls_port=free_port()) as idp:
        assert idp.tls_port
        settings = qemu_settings(f"sqlite:///{tmp / 'refresh.db'}",
                                 guest_host_allowed_ports=[idp.port, idp.tls_port])
        require_images(settings, "cli")
        ctx = AppContext.create(settings)
        try:
            user = users_service.create_user(ctx.db, "refresher")
            vm, _ = vm_manager.ensure_cli_vm(ctx, Principal(user.id, user.name, False))
            guest = install_redirect(ctx, vm, idp_tls_port=idp.tls_port, ca_pem=ca.ca_pem)
            # The built-in profiles, as a real deployment has them (no test overrides).
            yield World(ctx, idp, vm, guest, load_profiles(settings, environ={}))
        finally:
            close_and_clean(ctx)


def _deliver_expired(world: World, provider: str, tokens: dict[str, Any], age_s: float) -> None:
    """Write the CLI's files the way a sign-in's delivery does, as if obtained ``age_s`` ago."""
    tokens = {**tokens, "obtained_at": time.time() - age_s}
    rendered = render_credentials(world.profiles[provider], tokens, utcnow())
    credentials._write_and_verify(world.ctx, world.vm, rendered.files)


def _refresh_grant(world: World, refresh_token: str) -> dict[str, Any]:
    grants = [g for g in world.idp.events("grant") if g.get("grant_type") == "refresh_token"
              and g.get("refresh_token_sha256") == token_digest(refresh_token)]
    assert len(grants) == 1, (grants, world.idp.logs()[-4000:])
    return grants[0]


def test_claude_code_refreshes_with_the_delivered_refresh_token(world: World) -> None:
    profile = world.profiles["claude_code"]
    tokens = headless_tokens(world.idp.url, client_id=profile.client_id, redirect_uri="http://localhost:54545/callback",
                             scope=" ".join(profile.scopes), user="alice", password=PASSWORD, json_body=True)
    _deliver_expired(world, "claude_code", tokens, age_s=28800 + 600)  # 8 h tokens, 10 minutes past expiry
    before = world.guest.read_json("/home/cli/.claude/.credentials.json")["claudeAiOauth"]
    assert before["expiresAt"] < time.time() * 1000

    # A prompt needs a live token: Claude Code refreshes first, then fails to reach the API (caught).
    _code, output = world.guest.run_cli(["claude", "-p", "hi"], timeout_s=300)

    grant = _refresh_grant(world, tokens["refresh_token"])
    assert grant["client_id"] == profile.client_id
    assert (grant["host"], grant["path"], grant["tls"]) == ("platform.claude.com", "/v1/oauth/token", True), grant
    assert {"event": "tls_connection", "servername": "platform.claude.com"} in world.idp.events("tls_connection")
    after = world.guest.read_json("/home/cli/.claude/.credentials.json")["claudeAiOauth"]
    assert after["accessToken"] != tokens["access_token"], output[-2000:]
    assert after["refreshToken"] != tokens["refresh_token"]  # rotated, as Anthropic does, and written back
    assert after["expiresAt"] > (time.time() + 28000) * 1000
    assert "forwarded a connection" in world.guest.forwarder_log()
    assert_cli_signed_in(world.ctx, world.vm.id, "claude_code")


def test_codex_refreshes_with_the_delivered_refresh_token(world: World) -> None:
    profile = world.profiles["codex"]
    tokens = headless_tokens(world.idp.url, client_id=profile.client_id, redirect_uri=profile.redirect_uri,
                             scope="openid profile email offline_access", user="alice", password=PASSWORD)
    # Codex refreshes by the age of last_refresh (the delivery writes when the tokens were obtained).
    _deliver_expired(world, "codex", tokens, age_s=40 * 86400)
    before = world.guest.read_json("/home/cli/.codex/auth.json")

    # Codex's own override for its token endpoint (verified in the pinned binary).
    override = {"CODEX_REFRESH_TOKEN_URL_OVERRIDE": f"http://10.0.2.2:{world.idp.port}/oauth/token"}
    _code, output = world.guest.run_cli(["timeout", "-s", "INT", "120", "codex", "exec", "--skip-git-repo-check",
                                        "hi"], env=override, timeout_s=200)

    grant = _refresh_grant(world, tokens["refresh_token"])
    assert grant["client_id"] == profile.client_id
    assert (grant["host"], grant["path"]) == (f"10.0.2.2:{world.idp.port}", "/oauth/token"), grant
    after = world.guest.read_json("/home/cli/.codex/auth.json")
    assert after["tokens"]["access_token"] != tokens["access_token"], output[-2000:]
    assert after["tokens"]["refresh_token"] != tokens["refresh_token"]  # rotated, as OpenAI does
    assert after["last_refresh"] > before["last_refresh"]
    assert_cli_signed_in(world.ctx, world.vm.id, "codex")


def test_gemini_refreshes_with_the_delivered_refresh_token(world: World) -> None:
    profile = world.profiles["gemini"]
    tokens = headless_tokens(world.idp.url, client_id=profile.client_id,
                             redirect_uri="http://127.0.0.1:45454/oauth2callback",
                             scope="openid email offline_access " + " ".join(profile.scopes), user="alice",
                             password=PASSWORD, client_secret=profile.client_secret)
    _deliver_expired(world, "gemini", tokens, age_s=7200)  # 1 h tokens, an hour past expiry
    before = world.guest.read_json("/home/cli/.gemini/oauth_creds.json")
    assert before["expiry_date"] < time.time() * 1000

    _code, output = world.guest.run_cli(["gemini", "-p", "hi"], timeout_s=300)

    grant = _refresh_grant(world, tokens["refresh_token"])
    assert grant["client_id"] == profile.client_id
    assert (grant["host"], grant["path"], grant["tls"]) == ("oauth2.googleapis.com", "/token", True), grant
    after = world.guest.read_json("/home/cli/.gemini/oauth_creds.json")
    assert after["access_token"] != tokens["access_token"], output[-2000:]
    assert after["access_token"].startswith("ya29.")
    assert after["refresh_token"] == tokens["refresh_token"]  # Google keeps the refresh token
    assert after["expiry_date"] > time.time() * 1000


def test_the_guest_reaches_no_real_provider(world: World) -> None:
    """The redirect's guarantee: no default route, and the providers' names point at the loopback."""
    routes = world.guest.root(["ip", "route"]).stdout.decode()
    assert "default" not in routes, routes
    probe = world.guest.root(["sh", "-c", "getent hosts api.anthropic.com auth.openai.com oauth2.googleapis.com"])
    assert {line.split()[0] for line in probe.stdout.decode().splitlines()} == {"127.0.0.1"}
    assert world.guest.root(["ip", "route", "get", "1.1.1.1"]).exit_code != 0
    errors = [e for e in world.idp.events("tls_error") if e.get("servername") in
              ("platform.claude.com", "auth.openai.com", "oauth2.googleapis.com")]
    assert errors == [], errors  # every token host's connection was the IdP's, with the test CA trusted
