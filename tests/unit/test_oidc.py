"""Dashboard single sign-on (OpenID Connect): the flow, user mapping, and every way it can fail.

The identity provider here is a fake on ``httpx.MockTransport`` (no network): discovery, JWKS, a
token endpoint that checks the client's credentials, the code, the redirect URI and the PKCE
verifier, and a userinfo endpoint. It signs ID tokens with a real RSA key (joserfc), and each test
can bend one thing (a claim, the key, the algorithm, the answer). Every failure must answer with
its stable code and change nothing in the database. Both databases.

The real provider (oidc-provider) and a real browser: ``tests/e2e/test_sso.py``.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import re
import secrets
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from authlib.oidc.core.util import create_half_hash
from click.testing import CliRunner
from fastapi.testclient import TestClient
from joserfc import jwt
from joserfc.jwk import OctKey, RSAKey
from pydantic import ValidationError
from sqlalchemy import func, inspect, select

from remotecli.app import create_app
from remotecli.config import Settings
from remotecli.context import AppContext
from remotecli.db.models import ApiToken, Event, User, UserIdentity
from remotecli.db.session import Database
from remotecli.drivers.fake import FakeDriver
from remotecli.errors import AlreadyExists, InvalidInput
from remotecli.logging import JsonFormatter
from remotecli.services import dashboard_sessions as sessions
from remotecli.services import oidc
from remotecli.services import users as users_service

ISSUER = "https://idp.test"
CLIENT_ID = "remotecli-dashboard"
CLIENT_SECRET = "client-secret-0f9e8d7c6b5a4321"
PASSWORD = "correct horse battery"

_KEYS: dict[str, RSAKey] = {}


def rsa_key(kid: str) -> RSAKey:
    """RSA keys are slow to make: one per kid for the whole module."""
    if kid not in _KEYS:
        _KEYS[kid] = RSAKey.generate_key(2048, parameters={"kid": kid, "use": "sig", "alg": "RS256"})
    return _KEYS[kid]


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


@dataclass
class FakeIdp:
    """A small OpenID provider. Knobs: ``claims`` (merged into the next ID tokens), ``sign``
    (replaces signing), ``token_answer`` (replaces the token endpoint's answer), ``down``."""

    issuer: str = ISSUER
    key: RSAKey = field(default_factory=lambda: rsa_key("k1"))
    published: list[RSAKey] = field(default_factory=list)
    claims: dict[str, Any] = field(default_factory=dict)
    drop_claims: set[str] = field(default_factory=set)
    userinfo: dict[str, Any] | None = None
    sign: Callable[[dict[str, Any], dict[str, Any]], str] | None = None
    token_answer: Callable[[], httpx.Response] | None = None
    discovery_extra: dict[str, Any] = field(default_factory=dict)
    down: set[str] = field(default_factory=set)
    codes: dict[str, dict[str, Any]] = field(default_factory=dict)
    issued: list[str] = field(default_factory=list)  # every token and code handed out (leak checks)
    hits: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.published = [self.key]

    def discovery(self) -> dict[str, Any]:
        return {
            "issuer": self.issuer,
            "authorization_endpoint": f"{ISSUER}/auth",
            "token_endpoint": f"{ISSUER}/token",
            "jwks_uri": f"{ISSUER}/jwks",
            "userinfo_endpoint": f"{ISSUER}/me",
            "id_token_signing_alg_values_supported": ["RS256"],
            "token_endpoint_auth_methods_supported": ["client_secret_basic", "client_secret_post"],
            "authorization_response_iss_parameter_supported": True,
            **self.discovery_extra,
        }

    def handler(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path
        self.hits[path] = self.hits.get(path, 0) + 1
        if path in self.down or "*" in self.down:
            raise httpx.ConnectError("connection refused", request=request)
        if path == "/.well-known/openid-configuration":
            return httpx.Response(200, json=self.discovery())
        if path == "/jwks":
            return httpx.Response(200, json={"keys": [k.as_dict(private=False) for k in self.published]})
        if path == "/token":
            return self._token(request)
        if path == "/me":
            if self.userinfo is None:
                return httpx.Response(404)
            return httpx.Response(200, json=self.userinfo)
        return httpx.Response(404)

    def _token(self, request: httpx.Request) -> httpx.Response:
        form = {k: v[0] for k, v in parse_qs(request.content.decode()).items()}
        expected = "Basic " + base64.b64encode(f"{CLIENT_ID}:{CLIENT_SECRET}".encode()).decode()
        if request.headers.get("authorization") != expected:
            return httpx.Response(401, json={"error": "invalid_client"})
        grant = self.codes.pop(form.get("code", ""), None)
        if grant is None or form.get("grant_type") != "authorization_code":
            return httpx.Response(400, json={"error": "invalid_grant", "error_description": "unknown code"})
        challenge = b64(hashlib.sha256(form.get("code_verifier", "").encode()).digest())
        if challenge != grant["code_challenge"] or form.get("redirect_uri") != grant["redirect_uri"]:
            return httpx.Response(400, json={"error": "invalid_grant", "error_description": "PKCE or redirect"})
        if self.token_answer is not None:
            return self.token_answer()
        access = "at-" + secrets.token_urlsafe(24)
        now = int(time.time())
        claims = {"iss": self.issuer, "sub": grant["sub"], "aud": CLIENT_ID, "iat": now, "exp": now + 300,
                  "nonce": grant["nonce"], "at_hash": create_half_hash(access, "RS256").decode(),
                  "email": f"{grant['sub']}@example.test", "email_verified": True,
                  "preferred_username": grant["sub"], **grant["claims"], **self.claims}
        for name in self.drop_claims:
            claims.pop(name, None)
        header = {"alg": "RS256", "kid": self.key.kid}
        id_token = self.sign(header, claims) if self.sign else jwt.encode(header, claims, self.key)
        self.issued += [access, id_token]
        return httpx.Response(200, json={"access_token": access, "token_type": "Bearer", "expires_in": 300,
                                         "id_token": id_token})

    def authorize(self, url: str, sub: str = "carol", **claims: Any) -> dict[str, str]:
        """What the provider does after the user signs in: a code for these parameters."""
        query = {k: v[0] for k, v in parse_qs(urlsplit(url).query).items()}
        assert url.startswith(f"{ISSUER}/auth?")
        code = "code-" + secrets.token_urlsafe(16)
        self.codes[code] = {"sub": sub, "nonce": query["nonce"], "code_challenge": query["code_challenge"],
                            "redirect_uri": query["redirect_uri"], "claims": claims}
        self.issued.append(code)
        return {"code": code, "state": query["state"], "iss": self.issuer}


@pytest.fixture
def idp(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeIdp]:
    fake = FakeIdp()
    oidc.clear_cache()
    monkeypatch.setattr(oidc, "transport", httpx.MockTransport(fake.handler))
    yield fake
    oidc.clear_cache()


def sso_settings(tmp_path: Path, db_url: str, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "data_dir": tmp_path / "data", "database_url": db_url, "driver": "fake", "run_background": False,
        "oidc_issuer": ISSUER, "oidc_client_id": CLIENT_ID, "oidc_client_secret": CLIENT_SECRET,
        "oidc_display_name": "Acme SSO",
    }
    values.update(overrides)
    return Settings(**values)


@pytest.fixture
def make_client(tmp_path: Path, db_url: str, idp: FakeIdp) -> Iterator[Callable[..., tuple[TestClient, AppContext]]]:
    opened: list[tuple[TestClient, AppContext]] = []

    def make(**overrides: Any) -> tuple[TestClient, AppContext]:
        ctx = AppContext.create(sso_settings(tmp_path, db_url, **overrides), driver=FakeDriver())
        client = TestClient(create_app(ctx, background=False), raise_server_exceptions=False)
        client.__enter__()
        opened.append((client, ctx))
        return client, ctx

    yield make
    for client, ctx in opened:
        client.__exit__(None, None, None)
        ctx.close()


@pytest.fixture
def sso(make_client: Callable[..., tuple[TestClient, AppContext]]) -> tuple[TestClient, AppContext]:
    return make_client()


def start(client: TestClient, next_path: str | None = None) -> httpx.Response:
    response = client.get("/auth/oidc/login", params={"next": next_path} if next_path else None,
                          follow_redirects=False)
    assert response.status_code == 303, response.text
    return response


def sign_in(client: TestClient, idp: FakeIdp, sub: str = "carol", *, next_path: str | None = None,
            **claims: Any) -> httpx.Response:
    params = idp.authorize(start(client, next_path).headers["location"], sub=sub, **claims)
    return client.get("/auth/oidc/callback", params=params, follow_redirects=False)


def snapshot(db: Database) -> dict[str, Any]:
    with db.read() as session:
        return {
            "users": sorted((u.name, u.is_admin, u.disabled) for u in session.scalars(select(User))),
            "identities": sorted((i.issuer, i.subject, i.user_id) for i in session.scalars(select(UserIdentity))),
            "tokens": session.scalar(select(func.count()).select_from(ApiToken)),
            "events": session.scalar(select(func.count()).select_from(Event)),
        }


def assert_refused(response: httpx.Response, status: int, code: str) -> None:
    assert response.status_code == status, response.text[:500]
    if response.headers["content-type"].startswith("application/json"):
        assert response.json()["code"] == code
    else:
        assert f'<code id="error-code">{code}</code>' in response.text
        assert response.headers["referrer-policy"] == "no-referrer"
    assert "rcli_session" not in response.headers.get("set-cookie", "")


# ----------------------------------------------------------------------------------------------
# Settings


def test_settings_need_a_client_id_and_never_echo_the_secret(tmp_path: Path) -> None:
    with pytest.raises(ValidationError) as info:
        Settings(data_dir=tmp_path, oidc_issuer=ISSUER, oidc_client_secret=CLIENT_SECRET)
    assert "REMOTECLI_OIDC_CLIENT_ID" in str(info.value)
    assert CLIENT_SECRET not in str(info.value)
    with pytest.raises(ValidationError, match="https"):
        Settings(data_dir=tmp_path, oidc_issuer="http://idp.example.com", oidc_client_id="x")
    with pytest.raises(ValidationError, match="openid"):
        Settings(data_dir=tmp_path, oidc_issuer=ISSUER, oidc_client_id="x", oidc_scopes="email profile")
    with pytest.raises(ValidationError, match="REMOTECLI_OIDC_ISSUER is not"):
        Settings(data_dir=tmp_path, oidc_client_id="x")
    assert not Settings(data_dir=tmp_path, oidc_issuer=" ").oidc_enabled
    assert Settings(data_dir=tmp_path, oidc_issuer="http://127.0.0.1:9000", oidc_client_id="x").oidc_enabled
    settings = Settings(data_dir=tmp_path, oidc_issuer=ISSUER, oidc_client_id="x", oidc_client_secret=CLIENT_SECRET)
    assert CLIENT_SECRET not in repr(settings) and CLIENT_SECRET not in settings.model_dump_json()


def test_cli_reports_a_bad_configuration_in_words(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from remotecli.cli.main import main

    monkeypatch.setenv("REMOTECLI_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("REMOTECLI_OIDC_ISSUER", ISSUER)
    monkeypatch.setenv("REMOTECLI_OIDC_CLIENT_SECRET", CLIENT_SECRET)
    result = CliRunner().invoke(main, ["users", "list"])
    assert result.exit_code == 2
    assert "REMOTECLI_OIDC_CLIENT_ID" in result.output and CLIENT_SECRET not in result.output


def test_redirect_uri_from_public_url_or_the_request(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path)
    assert oidc.redirect_uri(settings, "http://127.0.0.1:8080/") == "http://127.0.0.1:8080/auth/oidc/callback"
    settings = Settings(data_dir=tmp_path, public_url="https://rc.example.com/")
    assert oidc.redirect_uri(settings, "http://127.0.0.1:8080/") == "https://rc.example.com/auth/oidc/callback"


# ----------------------------------------------------------------------------------------------
# Off by default


def test_without_an_issuer_there_is_no_button_and_the_routes_say_so(ctx: AppContext) -> None:
    with TestClient(create_app(ctx, background=False)) as client:
        assert "/auth/oidc/login" not in client.get("/login").text
        page = client.get("/auth/oidc/login", follow_redirects=False)
        assert_refused(page, 404, "sso_not_configured")
        answer = client.get("/auth/oidc/callback?state=x&code=y", headers={"accept": "application/json"})
        assert_refused(answer, 404, "sso_not_configured")


# ----------------------------------------------------------------------------------------------
# The flow


def test_sign_in_creates_the_user_and_a_dashboard_session(sso: tuple[TestClient, AppContext], idp: FakeIdp) -> None:
    client, ctx = sso
    login_page = client.get("/login").text
    assert "Sign in with Acme SSO" in login_page and 'href="/auth/oidc/login?next=%2Fdashboard"' in login_page

    redirect = start(client, "/dashboard/remote-cli/terminal")
    query = {k: v[0] for k, v in parse_qs(urlsplit(redirect.headers["location"]).query).items()}
    assert query["response_type"] == "code" and query["client_id"] == CLIENT_ID
    assert query["redirect_uri"] == "http://testserver/auth/oidc/callback"
    assert query["scope"] == "openid email profile" and query["code_challenge_method"] == "S256"
    assert len(query["state"]) >= 43 and len(query["nonce"]) >= 43 and len(query["code_challenge"]) == 43
    cookie = redirect.headers["set-cookie"]
    assert cookie.startswith(oidc.attempt_cookie_name(query["state"]) + "=")
    assert "HttpOnly" in cookie and "SameSite=lax" in cookie and "Path=/auth/oidc" in cookie and "Max-Age=720" in cookie
    # The sealed attempt holds the nonce and verifier, but not readably.
    assert query["nonce"] not in cookie

    params = idp.authorize(redirect.headers["location"], sub="carol")
    done = client.get("/auth/oidc/callback", params=params, follow_redirects=False)
    assert done.status_code == 303 and done.headers["location"] == "/dashboard/remote-cli/terminal"
    set_cookies = done.headers.get_list("set-cookie")
    session_cookie = next(c for c in set_cookies if c.startswith("rcli_session="))
    assert "HttpOnly" in session_cookie and "SameSite=lax" in session_cookie and "Path=/" in session_cookie
    assert any(c.startswith(oidc.attempt_cookie_name(params["state"]) + '=""') for c in set_cookies)

    dashboard = client.get("/dashboard")
    assert dashboard.status_code == 200 and "carol" in dashboard.text
    with ctx.db.read() as db:
        user = db.scalars(select(User).where(User.name == "carol")).one()
        identity = db.scalars(select(UserIdentity)).one()
        kinds = [(e.kind, e.details) for e in db.scalars(select(Event).where(Event.user_id == user.id))]
    assert user.password_hash is None and not user.is_admin
    assert (identity.issuer, identity.subject, identity.user_id) == (ISSUER, "carol", user.id)
    assert identity.email == "carol@example.test"
    assert ("user.created", {"admin": False, "via": "oidc", "issuer": ISSUER}) in kinds
    assert any(kind == "user.login" and details and details["method"] == "oidc" for kind, details in kinds)


def test_next_page_is_kept_but_never_leaves_the_site(sso: tuple[TestClient, AppContext], idp: FakeIdp) -> None:
    client, _ = sso
    assert sign_in(client, idp, next_path="https://evil.example/").headers["location"] == "/dashboard"
    client.cookies.clear()
    assert sign_in(client, idp, next_path="//evil.example").headers["location"] == "/dashboard"


def test_starting_again_while_signed_in_goes_straight_on(sso: tuple[TestClient, AppContext], idp: FakeIdp) -> None:
    client, _ = sso
    assert sign_in(client, idp).status_code == 303
    again = client.get("/auth/oidc/login", params={"next": "/admin"}, follow_redirects=False)
    assert again.status_code == 303 and again.headers["location"] == "/admin"
    assert idp.hits["/token"] == 1


def test_doctor_checks_the_provider(sso: tuple[TestClient, AppContext], idp: FakeIdp,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    from remotecli.cli.main import main

    _client, ctx = sso
    for name, value in {"DATA_DIR": str(ctx.settings.data_dir), "DATABASE_URL": ctx.settings.effective_database_url,
                        "DRIVER": "fake", "OIDC_ISSUER": ISSUER, "OIDC_CLIENT_ID": CLIENT_ID,
                        "OIDC_CLIENT_SECRET": CLIENT_SECRET, "PUBLIC_URL": "https://rc.example.com"}.items():
        monkeypatch.setenv(f"REMOTECLI_{name}", value)
    result = CliRunner().invoke(main, ["doctor", "--json"])
    line = next(c for c in json.loads(result.output) if c["check"] == "single sign-on")
    assert line["ok"] and "https://rc.example.com/auth/oidc/callback" in line["detail"]
    idp.down.add("*")
    result = CliRunner().invoke(main, ["doctor", "--json"])
    line = next(c for c in json.loads(result.output) if c["check"] == "single sign-on")
    assert not line["ok"] and "discovery" in line["detail"] and result.exit_code == 1
    assert CLIENT_SECRET not in result.output


def test_the_same_identity_is_the_same_user_whatever_its_name_or_email(sso: tuple[TestClient, AppContext],
                                                                      idp: FakeIdp) -> None:
    client, ctx = sso
    assert sign_in(client, idp, sub="u-123", preferred_username="carol").status_code == 303
    client.cookies.clear()
    answer = sign_in(client, idp, sub="u-123", preferred_username="caroline", email="new@example.test")
    assert answer.status_code == 303
    state = snapshot(ctx.db)
    assert [name for name, _, _ in state["users"]] == ["carol"]
    with ctx.db.read() as db:
        assert db.scalars(select(UserIdentity.email)).one() == "new@example.test"


def test_a_local_user_is_never_taken_over_by_name_or_email(sso: tuple[TestClient, AppContext], idp: FakeIdp) -> None:
    client, ctx = sso
    local = users_service.create_user(ctx.db, "carol")
    users_service.set_password(ctx.db, "carol", PASSWORD)
    answer = sign_in(client, idp, sub="idp-carol", preferred_username="carol", email="carol@example.test")
    assert answer.status_code == 303
    assert "carol-2" in client.get("/dashboard").text
    with ctx.db.read() as db:
        identity = db.scalars(select(UserIdentity)).one()
        sso_user = db.get(User, identity.user_id)
    assert sso_user is not None and sso_user.name == "carol-2" and sso_user.id != local.id
    assert users_service.verify_password(ctx.db, "carol", PASSWORD).user_id == local.id


def test_an_operator_links_a_local_user_explicitly(sso: tuple[TestClient, AppContext], idp: FakeIdp,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    client, ctx = sso
    local = users_service.create_user(ctx.db, "dave")
    oidc.link_identity(ctx.db, "dave", "idp-dave", ISSUER + "/")
    with pytest.raises(AlreadyExists):
        oidc.link_identity(ctx.db, "dave", "idp-dave", ISSUER)
    with pytest.raises(InvalidInput):
        oidc.link_identity(ctx.db, "dave", "", ISSUER)
    assert sign_in(client, idp, sub="idp-dave", preferred_username="someone-else").status_code == 303
    assert "dave" in client.get("/dashboard").text
    assert [name for name, _, _ in snapshot(ctx.db)["users"]] == ["dave"]
    # Without a password, the session lives only as long as the link.
    assert oidc.unlink_identities(ctx.db, "dave") == 1
    assert client.get("/dashboard", follow_redirects=False).status_code == 303
    assert oidc.identities(ctx.db) == [] and local.id


def test_cli_links_disables_and_unlinks(sso: tuple[TestClient, AppContext], idp: FakeIdp,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    from remotecli.cli.main import main

    client, ctx = sso
    settings = ctx.settings
    monkeypatch.setenv("REMOTECLI_DATA_DIR", str(settings.data_dir))
    monkeypatch.setenv("REMOTECLI_DATABASE_URL", settings.effective_database_url)
    monkeypatch.setenv("REMOTECLI_OIDC_ISSUER", ISSUER)
    monkeypatch.setenv("REMOTECLI_OIDC_CLIENT_ID", CLIENT_ID)
    runner = CliRunner()
    users_service.create_user(ctx.db, "erin")
    result = runner.invoke(main, ["users", "link-sso", "erin", "--subject", "idp-erin"])
    assert result.exit_code == 0, result.output
    assert sign_in(client, idp, sub="idp-erin").status_code == 303
    client.cookies.clear()
    assert runner.invoke(main, ["users", "disable", "erin"]).exit_code == 0
    before = snapshot(ctx.db)
    assert_refused(sign_in(client, idp, sub="idp-erin"), 403, "sso_account_disabled")
    assert snapshot(ctx.db) == before
    assert runner.invoke(main, ["users", "enable", "erin"]).exit_code == 0
    assert sign_in(client, idp, sub="idp-erin").status_code == 303
    result = runner.invoke(main, ["users", "unlink-sso", "erin"])
    assert result.exit_code == 0 and "Removed 1" in result.output


def test_disabled_users_sessions_end_too(sso: tuple[TestClient, AppContext], idp: FakeIdp) -> None:
    client, ctx = sso
    assert sign_in(client, idp, sub="frank").status_code == 303
    assert client.get("/dashboard").status_code == 200
    users_service.set_disabled(ctx.db, "frank", True)
    assert client.get("/dashboard", follow_redirects=False).status_code == 303


def test_deleted_users_identity_goes_with_them(make_client: Callable[..., tuple[TestClient, AppContext]],
                                               idp: FakeIdp) -> None:
    client, ctx = make_client(oidc_auto_create_users=False)
    users_service.create_user(ctx.db, "gina")
    oidc.link_identity(ctx.db, "gina", "idp-gina", ISSUER)
    with ctx.db.transaction() as db:
        db.delete(db.scalars(select(User).where(User.name == "gina")).one())
    before = snapshot(ctx.db)
    assert before["identities"] == []
    assert_refused(sign_in(client, idp, sub="idp-gina"), 403, "sso_no_account")
    assert snapshot(ctx.db) == before


def test_without_auto_creation_unknown_identities_are_refused(make_client: Callable[..., tuple[TestClient, AppContext]],
                                                              idp: FakeIdp) -> None:
    client, ctx = make_client(oidc_auto_create_users=False)
    before = snapshot(ctx.db)
    assert_refused(sign_in(client, idp, sub="stranger"), 403, "sso_no_account")
    assert snapshot(ctx.db) == before


def test_allowed_domains_need_a_verified_email(make_client: Callable[..., tuple[TestClient, AppContext]],
                                               idp: FakeIdp) -> None:
    client, ctx = make_client(oidc_allowed_email_domains="acme.test, example.org")
    before = snapshot(ctx.db)
    assert_refused(sign_in(client, idp, sub="h1", email="h1@other.test"), 403, "sso_no_account")
    assert_refused(sign_in(client, idp, sub="h2", email="h2@acme.test", email_verified=False), 403, "sso_no_account")
    assert snapshot(ctx.db) == before
    assert sign_in(client, idp, sub="h3", email="H3@Acme.test").status_code == 303


def test_admin_emails_grant_the_admin_role_only_when_verified(
        make_client: Callable[..., tuple[TestClient, AppContext]], idp: FakeIdp) -> None:
    client, ctx = make_client(oidc_admin_emails="boss@example.test")
    assert sign_in(client, idp, sub="boss", email="boss@example.test", email_verified=False).status_code == 303
    assert ("boss", False, False) in snapshot(ctx.db)["users"]
    client.cookies.clear()
    assert sign_in(client, idp, sub="boss", email="boss@example.test").status_code == 303
    assert ("boss", True, False) in snapshot(ctx.db)["users"]
    assert client.get("/admin").status_code == 200


def test_two_tabs_sign_in_at_once(sso: tuple[TestClient, AppContext], idp: FakeIdp) -> None:
    client, _ = sso
    first = idp.authorize(start(client).headers["location"], sub="ivy")
    second = idp.authorize(start(client).headers["location"], sub="ivy")
    assert client.get("/auth/oidc/callback", params=second, follow_redirects=False).status_code == 303
    assert client.get("/auth/oidc/callback", params=first, follow_redirects=False).status_code == 303


def test_userinfo_fills_in_what_the_id_token_leaves_out(sso: tuple[TestClient, AppContext], idp: FakeIdp) -> None:
    client, ctx = sso
    idp.drop_claims = {"email", "email_verified", "preferred_username"}
    idp.userinfo = {"sub": "u-77", "email": "jules@example.test", "email_verified": True, "preferred_username": "jules"}
    assert sign_in(client, idp, sub="u-77").status_code == 303
    client.cookies.clear()
    idp.userinfo = {"sub": "somebody-else", "preferred_username": "mallory"}  # about another subject: ignored
    assert sign_in(client, idp, sub="u-78").status_code == 303
    names = [name for name, _, _ in snapshot(ctx.db)["users"]]
    assert names == ["jules", "user"]


def test_new_signing_key_is_fetched_once(sso: tuple[TestClient, AppContext], idp: FakeIdp,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    client, _ = sso
    assert sign_in(client, idp).status_code == 303
    assert idp.hits["/jwks"] == 1 and idp.hits["/.well-known/openid-configuration"] == 1
    client.cookies.clear()
    idp.key = rsa_key("k2")
    idp.published = [rsa_key("k1"), rsa_key("k2")]
    monkeypatch.setattr(oidc, "JWKS_REFRESH_MIN_INTERVAL_S", 0.0)
    assert sign_in(client, idp).status_code == 303
    assert idp.hits["/jwks"] == 2 and idp.hits["/.well-known/openid-configuration"] == 1


# ----------------------------------------------------------------------------------------------
# Refusals: each with its code, nothing changed


def _forged(claims: dict[str, Any], key: Any, alg: str = "RS256", kid: str | None = "k1") -> str:
    header = {"alg": alg, **({"kid": kid} if kid else {})}
    return jwt.encode(header, claims, key)


REFUSALS: dict[str, tuple[Callable[[FakeIdp], None], int, str]] = {
    "id token signed with another key": (
        lambda idp: setattr(idp, "sign", lambda h, c: _forged(c, rsa_key("evil-k1-same-kid-other-key"))),
        502, "sso_id_token_invalid"),
    "id token signed with HS256 and the client secret": (
        lambda idp: setattr(idp, "sign", lambda h, c: _forged(c, OctKey.import_key(CLIENT_SECRET * 2), "HS256")),
        502, "sso_id_token_invalid"),
    "unsigned id token (alg none)": (
        lambda idp: setattr(idp, "sign", lambda h, c: b64(b'{"alg":"none"}') + "." + b64(json.dumps(c).encode()) + "."),
        502, "sso_id_token_invalid"),
    "id token for another client": (lambda idp: idp.claims.update(aud="someone-else"), 502, "sso_id_token_invalid"),
    "id token from another issuer": (lambda idp: idp.claims.update(iss="https://evil.test"), 502,
                                     "sso_id_token_invalid"),
    "expired id token": (lambda idp: idp.claims.update(exp=int(time.time()) - 3600, iat=int(time.time()) - 7200),
                         502, "sso_id_token_invalid"),
    "id token with another nonce": (lambda idp: idp.claims.update(nonce="replayed-nonce"), 502,
                                    "sso_id_token_invalid"),
    "id token without a nonce": (lambda idp: idp.drop_claims.add("nonce"), 502, "sso_id_token_invalid"),
    "id token without a subject": (lambda idp: idp.drop_claims.add("sub"), 502, "sso_id_token_invalid"),
    "id token whose at_hash does not match": (lambda idp: idp.claims.update(at_hash="AAAAAAAAAAAAAAAAAAAAAA"), 502,
                                              "sso_id_token_invalid"),
    "id token with an azp of another client": (lambda idp: idp.claims.update(azp="other"), 502,
                                               "sso_id_token_invalid"),
    "token response without an id token": (
        lambda idp: setattr(idp, "token_answer", lambda: httpx.Response(200, json={"access_token": "at-x",
                                                                                   "token_type": "Bearer"})),
        502, "sso_id_token_invalid"),
    "token endpoint refuses the code": (
        lambda idp: setattr(idp, "token_answer", lambda: httpx.Response(400, json={"error": "invalid_grant"})),
        502, "sso_token_exchange_failed"),
    "token endpoint answers garbage": (
        lambda idp: setattr(idp, "token_answer", lambda: httpx.Response(200, text="<html>")),
        502, "sso_token_exchange_failed"),
    "token endpoint is down": (lambda idp: idp.down.add("/token"), 503, "sso_unavailable"),
    "token endpoint fails": (lambda idp: setattr(idp, "token_answer", lambda: httpx.Response(503, text="busy")),
                             503, "sso_unavailable"),
    "keys are unreachable": (lambda idp: idp.down.add("/jwks"), 503, "sso_unavailable"),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_a_bad_answer_from_the_provider_signs_nobody_in(case: str, sso: tuple[TestClient, AppContext],
                                                        idp: FakeIdp) -> None:
    client, ctx = sso
    bend, status, code = REFUSALS[case]
    params = idp.authorize(start(client).headers["location"], sub="mallory")
    bend(idp)
    before = snapshot(ctx.db)
    answer = client.get("/auth/oidc/callback", params=params, follow_redirects=False)
    assert_refused(answer, status, code)
    assert snapshot(ctx.db) == before
    assert "mallory" not in answer.text


def test_callback_refusals(sso: tuple[TestClient, AppContext], idp: FakeIdp, monkeypatch: pytest.MonkeyPatch) -> None:
    client, ctx = sso
    before = snapshot(ctx.db)
    json_accept = {"accept": "application/json"}
    params = idp.authorize(start(client).headers["location"])

    # No state, an unknown state, the state of another attempt.
    assert_refused(client.get("/auth/oidc/callback", params={"code": params["code"]}), 400, "sso_state_invalid")
    assert_refused(client.get("/auth/oidc/callback", params={**params, "state": "forged"}, headers=json_accept),
                   400, "sso_state_invalid")
    # Another browser (no attempt cookie) with the right state and code: a login-CSRF attempt.
    with TestClient(client.app, raise_server_exceptions=False) as stranger:
        assert_refused(stranger.get("/auth/oidc/callback", params=params), 400, "sso_state_invalid")
    # A tampered attempt cookie.
    name = oidc.attempt_cookie_name(params["state"])
    sealed = client.cookies[name]
    client.cookies.set(name, sealed[:-4] + ("AAAA" if not sealed.endswith("AAAA") else "BBBB"),
                       domain="testserver.local", path="/auth/oidc")
    assert_refused(client.get("/auth/oidc/callback", params=params), 400, "sso_state_invalid")
    client.cookies.clear()

    # The provider's own refusal, a callback without a code, a mixed-up issuer.
    params = idp.authorize(start(client).headers["location"])
    assert_refused(client.get("/auth/oidc/callback", params={"state": params["state"], "error": "access_denied",
                                                             "error_description": "no"}), 403, "sso_denied")
    params = idp.authorize(start(client).headers["location"])
    assert_refused(client.get("/auth/oidc/callback", params={"state": params["state"]}), 400, "sso_callback_invalid")
    params = idp.authorize(start(client).headers["location"])
    assert_refused(client.get("/auth/oidc/callback", params={**params, "iss": "https://evil.test"}),
                   400, "sso_callback_invalid")

    # Too slow: the attempt expires after ten minutes.
    params = idp.authorize(start(client).headers["location"])
    real_time = time.time
    monkeypatch.setattr(oidc.time, "time", lambda: real_time() + oidc.ATTEMPT_TTL_S + 1)
    slow = client.get("/auth/oidc/callback", params=params)
    assert_refused(slow, 400, "sso_state_invalid")
    assert "ten minutes" in slow.text
    monkeypatch.setattr(oidc.time, "time", real_time)
    assert snapshot(ctx.db) == before

    # A replayed callback (the attempt cookie is gone after use) signs nobody in again.
    params = idp.authorize(start(client).headers["location"])
    assert client.get("/auth/oidc/callback", params=params, follow_redirects=False).status_code == 303
    after = snapshot(ctx.db)
    client.cookies.delete(sessions.SESSION_COOKIE)
    assert_refused(client.get("/auth/oidc/callback", params=params), 400, "sso_state_invalid")
    assert snapshot(ctx.db) == after


def test_an_unreachable_or_wrong_provider_at_the_start(sso: tuple[TestClient, AppContext], idp: FakeIdp) -> None:
    client, ctx = sso
    idp.down.add("*")
    page = client.get("/auth/oidc/login", follow_redirects=False)
    assert_refused(page, 503, "sso_unavailable")
    assert "Try again" in page.text and "sign in with your password" in page.text
    assert "set-cookie" not in page.headers
    idp.down.clear()
    idp.issuer = "https://evil.test"  # the discovery document names another issuer
    assert_refused(client.get("/auth/oidc/login", headers={"accept": "application/json"}), 503, "sso_unavailable")
    idp.issuer = ISSUER
    idp.discovery_extra = {"token_endpoint": "http://idp.test/token"}  # plain http off loopback
    assert_refused(client.get("/auth/oidc/login"), 503, "sso_unavailable")
    assert snapshot(ctx.db)["users"] == []


# ----------------------------------------------------------------------------------------------
# Secrets


def test_no_secret_reaches_a_log_an_event_or_a_page(sso: tuple[TestClient, AppContext], idp: FakeIdp,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    client, ctx = sso
    pages: list[str] = []
    verifier_seen: list[str] = []
    real_prepare = oidc.prepare_token_request

    def spy(*args: Any, **kwargs: Any) -> Any:
        verifier_seen.append(kwargs["code_verifier"])
        return real_prepare(*args, **kwargs)

    oidc.prepare_token_request = spy  # type: ignore[assignment]
    try:
        answer = sign_in(client, idp, sub="kim")
        pages += [answer.text, client.get("/dashboard").text]
        client.cookies.clear()
        for bend in ("id token with another nonce", "token endpoint refuses the code", "token endpoint is down"):
            params = idp.authorize(start(client).headers["location"], sub="kim")
            REFUSALS[bend][0](idp)
            pages.append(client.get("/auth/oidc/callback", params=params).text)
            idp.claims.clear()
            idp.token_answer = None
            idp.down.clear()
            client.cookies.clear()
    finally:
        oidc.prepare_token_request = real_prepare  # type: ignore[assignment]
    formatter = JsonFormatter()
    logged = "\n".join(formatter.format(record) for record in caplog.records)
    assert "single sign-on refused" in logged and "sso_id_token_invalid" in logged
    with ctx.db.read() as db:
        events = "\n".join(f"{e.message} {json.dumps(e.details)}" for e in db.scalars(select(Event)))
    secrets_ = [CLIENT_SECRET, *idp.issued, *verifier_seen]
    assert len(secrets_) > 6
    for haystack in (logged, events, *pages):
        for secret in secrets_:
            assert secret not in haystack


def test_the_log_formatter_redacts_oauth_values_in_urls() -> None:
    record = logging.LogRecord("uvicorn.access", logging.INFO, __file__, 1, '%s - "%s %s HTTP/%s" %d',
                               ("127.0.0.1:5000", "GET", "/auth/oidc/callback?code=c0de-SECRET_1&state=st4te"
                                "&iss=https%3A%2F%2Fidp.test", "1.1", 303), None)
    line = JsonFormatter().format(record)
    assert "c0de-SECRET_1" not in line and "st4te" not in line
    assert "code=[redacted]&state=[redacted]&iss=https" in line


def test_migration_0005_goes_down_and_up(empty_db_url: str) -> None:
    from alembic import command

    db = Database(empty_db_url)
    try:
        db.migrate()
        cfg = db.alembic_config()
        with db.engine.begin() as connection:
            cfg.attributes["connection"] = connection
            command.downgrade(cfg, "0004")
        assert db.current_revision() == "0004"
        with db.engine.connect() as connection:
            assert "user_identities" not in inspect(connection).get_table_names()
        db.migrate()
        assert db.current_revision() == db.head_revision()
        with db.engine.connect() as connection:
            assert "user_identities" in inspect(connection).get_table_names()
    finally:
        db.dispose()


def test_names_for_new_users() -> None:
    assert oidc._name_base({"preferred_username": "Jane Doe"}) == "jane-doe"
    assert oidc._name_base({"email": "j.o'hara+x@example.test"}) == "j.o-hara-x"
    assert oidc._name_base({"name": "---"}) == "user"
    assert oidc._name_base({"preferred_username": "x" * 100}) == "x" * 56
    assert re.match(r"^[a-z0-9][a-z0-9._-]{0,63}$", oidc._name_base({"preferred_username": "Ünïcödé"}))
