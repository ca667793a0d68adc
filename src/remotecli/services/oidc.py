"""Dashboard single sign-on through OpenID Connect (ADR 0008).

The authorization-code flow with PKCE (S256), ``state`` and ``nonce``, built from Authlib's
protocol pieces (authorize URL, token request, client authentication, ID token claims) and
joserfc (the JOSE library Authlib itself uses) for the ID token's signature:

``start_login``
    reads the provider's discovery document (``{issuer}/.well-known/openid-configuration``,
    cached), makes a fresh ``state``, ``nonce`` and PKCE verifier, and returns the authorize URL
    plus the *login attempt*: the nonce, verifier, redirect URI and next page, sealed with the
    controller's AES-256-GCM key (associated data ``oidc-login:<state>``), for a cookie that lives
    ten minutes, is HttpOnly and SameSite=Lax, is sent only to ``/auth/oidc`` and is named after
    the state (two tabs can sign in at once). Nothing is written to the database.

``complete_login``
    takes the callback's query and the browser's cookies: the state must match a sealed attempt
    from this browser that has not expired; then the code is exchanged (with the verifier and the
    client's credentials), the ID token's signature is checked against the provider's JWKS (only
    asymmetric algorithms the provider announces; never ``none`` or HMAC) and its ``iss``,
    ``aud``, ``azp``, ``exp``, ``iat``, ``nonce`` and ``at_hash``. Only then is the identity mapped
    to a user, by (issuer, ``sub``) and never by email or name: an unknown identity gets a new
    user (``oidc_auto_create_users``) with a free name, so a local account is never taken over by
    an SSO identity that happens to carry the same name or email; an operator links the two
    explicitly (``remotecli users link-sso``). Disabled users are refused.

Every failure raises an ``SsoError`` (``remotecli.errors``) with a stable code and a message in
words, before anything is written. The client secret, the code, the verifier and every token stay
out of logs, events, responses and exception messages; ``log_detail`` names what failed, never a
value.

Why one module of about 600 lines: the flow is one security contract (state, nonce, PKCE, the
sealed attempt, the ID token's checks, the identity mapping); kept together it can be read and
reviewed top to bottom, and nothing here is used by another service.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
import secrets
import threading
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import httpx
from authlib.common.errors import AuthlibBaseError
from authlib.oauth2.auth import ClientAuth
from authlib.oauth2.rfc6749.parameters import prepare_grant_uri, prepare_token_request
from authlib.oauth2.rfc7636 import create_s256_code_challenge
from authlib.oidc.core import CodeIDToken
from joserfc import jwt
from joserfc.errors import InvalidKeyIdError, JoseError
from joserfc.jwk import KeySet
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from remotecli.config import Settings
from remotecli.context import AppContext
from remotecli.crypto import DecryptionFailed
from remotecli.db.models import User, UserIdentity, utcnow
from remotecli.db.session import Database
from remotecli.errors import (
    AlreadyExists,
    InvalidInput,
    SsoAccountDisabled,
    SsoCallbackInvalid,
    SsoDenied,
    SsoIdTokenInvalid,
    SsoNoAccount,
    SsoNotConfigured,
    SsoStateInvalid,
    SsoTokenExchangeFailed,
    SsoUnavailable,
)
from remotecli.logging import get_logger
from remotecli.services.transitions import record_event
from remotecli.services.users import Principal, get_user_by_name

log = get_logger("sso")

CALLBACK_PATH = "/auth/oidc/callback"
LOGIN_PATH = "/auth/oidc/login"
#: Cookies of login attempts: ``rcli_oidc_<16 hex of sha256(state)>``, path ``/auth/oidc``.
ATTEMPT_COOKIE_PREFIX = "rcli_oidc_"
ATTEMPT_COOKIE_PATH = "/auth/oidc"
ATTEMPT_TTL_S = 600
METADATA_TTL_S = 3600.0
JWKS_REFRESH_MIN_INTERVAL_S = 30.0
CLOCK_LEEWAY_S = 60
#: ID token signatures we accept: asymmetric only (HMAC would make the client secret a signing key).
ASYMMETRIC_ALGS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA")
_ERROR_CODE_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")

#: Tests replace this with an ``httpx.MockTransport``; ``None`` is the network.
transport: httpx.BaseTransport | None = None


# ----------------------------------------------------------------------------------------------
# Provider metadata (discovery) and keys, cached per issuer


@dataclass
class ProviderMetadata:
    issuer: str
    authorization_endpoint: str
    token_endpoint: str
    jwks_uri: str
    userinfo_endpoint: str | None
    id_token_algs: tuple[str, ...]
    token_auth_methods: tuple[str, ...]
    iss_parameter_supported: bool
    fetched_at: float = field(default_factory=time.monotonic)


@dataclass
class _Entry:
    metadata: ProviderMetadata
    keys: KeySet | None = None
    keys_fetched_at: float = 0.0


_cache: dict[str, _Entry] = {}
_lock = threading.Lock()


def clear_cache() -> None:
    with _lock:
        _cache.clear()


def _client(settings: Settings) -> httpx.Client:
    return httpx.Client(timeout=settings.oidc_http_timeout_s, follow_redirects=False, transport=transport,
                        headers={"Accept": "application/json", "User-Agent": "remotecli-sso"})


def _get_json(settings: Settings, url: str, what: str, **kwargs: Any) -> dict[str, Any]:
    try:
        with _client(settings) as client:
            answer = client.get(url, **kwargs)
    except httpx.HTTPError as exc:
        raise SsoUnavailable(log_detail=f"{what}: {type(exc).__name__}") from None
    if answer.status_code != 200:
        raise SsoUnavailable(log_detail=f"{what}: HTTP {answer.status_code}")
    try:
        doc = answer.json()
    except ValueError:
        raise SsoUnavailable(log_detail=f"{what}: not JSON") from None
    if not isinstance(doc, dict):
        raise SsoUnavailable(log_detail=f"{what}: not a JSON object")
    return doc


def _endpoint(doc: Mapping[str, Any], name: str, *, required: bool = True) -> str | None:
    value = doc.get(name)
    if value is None and not required:
        return None
    if not isinstance(value, str):
        raise SsoUnavailable(log_detail=f"discovery: no {name}")
    parts = urlsplit(value)
    loopback = parts.hostname in ("localhost", "127.0.0.1", "::1") or (parts.hostname or "").startswith("127.")
    if parts.scheme != "https" and not (parts.scheme == "http" and loopback):
        raise SsoUnavailable(log_detail=f"discovery: {name} is not an https URL")
    return value


def _normalized(issuer: str) -> str:
    return issuer.rstrip("/")


def metadata(settings: Settings, *, refresh: bool = False) -> ProviderMetadata:
    """The provider's discovery document (cached for an hour); ``SsoUnavailable`` if unreachable or unusable."""
    if settings.oidc_issuer is None:
        raise SsoNotConfigured()
    key = _normalized(settings.oidc_issuer)
    with _lock:
        entry = _cache.get(key)
    if entry and not refresh and time.monotonic() - entry.metadata.fetched_at < METADATA_TTL_S:
        return entry.metadata
    doc = _get_json(settings, key + "/.well-known/openid-configuration", "discovery")
    issuer = doc.get("issuer")
    # OpenID Connect Discovery 4.3: the document's issuer is the configured one (a trailing slash aside).
    if not isinstance(issuer, str) or _normalized(issuer) != key:
        raise SsoUnavailable(log_detail="discovery: its issuer is not the configured REMOTECLI_OIDC_ISSUER")
    algs = doc.get("id_token_signing_alg_values_supported") or ["RS256"]
    methods = doc.get("token_endpoint_auth_methods_supported") or ["client_secret_basic"]
    meta = ProviderMetadata(
        issuer=issuer,
        authorization_endpoint=str(_endpoint(doc, "authorization_endpoint")),
        token_endpoint=str(_endpoint(doc, "token_endpoint")),
        jwks_uri=str(_endpoint(doc, "jwks_uri")),
        userinfo_endpoint=_endpoint(doc, "userinfo_endpoint", required=False),
        id_token_algs=tuple(str(a) for a in algs if a in ASYMMETRIC_ALGS) or ("RS256",),
        token_auth_methods=tuple(str(m) for m in methods),
        iss_parameter_supported=doc.get("authorization_response_iss_parameter_supported") is True,
    )
    with _lock:
        _cache[key] = _Entry(meta)
    return meta


def _keys(settings: Settings, meta: ProviderMetadata, *, refresh: bool = False) -> KeySet:
    key = _normalized(meta.issuer)
    with _lock:
        entry = _cache.setdefault(key, _Entry(meta))
        if entry.keys is not None:
            fresh = time.monotonic() - entry.keys_fetched_at < METADATA_TTL_S
            # A key id we do not know refreshes the set, but not more often than this (no amplification).
            throttled = time.monotonic() - entry.keys_fetched_at < JWKS_REFRESH_MIN_INTERVAL_S
            if (fresh and not refresh) or throttled:
                return entry.keys
    doc = _get_json(settings, meta.jwks_uri, "jwks")
    try:
        keys = KeySet.import_key_set(doc)  # type: ignore[arg-type]
    except (JoseError, ValueError, TypeError, KeyError):
        raise SsoUnavailable(log_detail="jwks: not a usable key set") from None
    with _lock:
        entry.keys, entry.keys_fetched_at = keys, time.monotonic()
    return keys


def check_provider(settings: Settings) -> tuple[bool, str]:
    """``remotecli doctor``'s line: the discovery document and the keys, fetched now."""
    try:
        meta = metadata(settings, refresh=True)
        keys = _keys(settings, meta, refresh=True)
    except SsoNotConfigured:
        return True, "off (REMOTECLI_OIDC_ISSUER is not set)"
    except SsoUnavailable as exc:
        return False, f"{settings.oidc_issuer}: {exc.log_detail or exc.message}"
    base = settings.public_url or f"http://{settings.host}:{settings.port}"
    return True, (f"{meta.issuer}: discovery and {len(keys.keys)} signing key(s) reachable; "
                  f"redirect URI to register: {redirect_uri(settings, base)}")


# ----------------------------------------------------------------------------------------------
# Starting a sign-in


@dataclass(frozen=True)
class LoginStart:
    authorize_url: str
    cookie_name: str
    cookie_value: str
    max_age: int


def redirect_uri(settings: Settings, base_url: str) -> str:
    """The callback URL to register at the provider: from ``public_url`` when set, else from the
    request's own base URL (scheme from X-Forwarded-Proto only through ``trusted_proxies``)."""
    base = settings.public_url or base_url
    return base.rstrip("/") + CALLBACK_PATH


def attempt_cookie_name(state: str) -> str:
    return ATTEMPT_COOKIE_PREFIX + hashlib.sha256(state.encode()).hexdigest()[:16]


def _aad(state: str) -> bytes:
    return b"oidc-login:" + state.encode()


def start_login(ctx: AppContext, *, redirect_to: str, next_path: str) -> LoginStart:
    """The provider's authorize URL and the sealed login attempt for the browser's cookie."""
    settings = ctx.settings
    if not settings.oidc_enabled or settings.oidc_client_id is None:
        raise SsoNotConfigured()
    meta = metadata(settings)
    state = secrets.token_urlsafe(32)
    nonce = secrets.token_urlsafe(32)
    verifier = secrets.token_urlsafe(48)  # 64 characters (RFC 7636: 43-128)
    url = prepare_grant_uri(
        meta.authorization_endpoint, client_id=settings.oidc_client_id, response_type="code",
        redirect_uri=redirect_to, scope=settings.oidc_scopes, state=state, nonce=nonce,
        code_challenge=create_s256_code_challenge(verifier), code_challenge_method="S256",
    )
    attempt = {
        "nonce": nonce, "verifier": verifier, "redirect_uri": redirect_to, "next": next_path,
        "issuer": meta.issuer, "client_id": settings.oidc_client_id, "exp": int(time.time()) + ATTEMPT_TTL_S,
    }
    sealed = ctx.box.encrypt(json.dumps(attempt).encode(), _aad(state))
    log.info("single sign-on started", extra={"x_issuer": meta.issuer})
    # The cookie outlives the attempt a little, so a late callback hears "too slow", not "another browser".
    return LoginStart(str(url), attempt_cookie_name(state), base64.urlsafe_b64encode(sealed).decode().rstrip("="),
                      ATTEMPT_TTL_S + 120)


# ----------------------------------------------------------------------------------------------
# Completing a sign-in


@dataclass(frozen=True)
class LoginResult:
    principal: Principal
    next_path: str
    created: bool
    issuer: str


def _open_attempt(ctx: AppContext, state: str, cookies: Mapping[str, str]) -> dict[str, Any]:
    sealed_text = cookies.get(attempt_cookie_name(state))
    if not sealed_text:
        raise SsoStateInvalid(log_detail="no login-attempt cookie for this state (another browser, or replayed)")
    try:
        sealed = base64.urlsafe_b64decode(sealed_text + "=" * (-len(sealed_text) % 4))
        attempt = json.loads(ctx.box.decrypt(sealed, _aad(state)))
    except (binascii.Error, ValueError, DecryptionFailed):
        raise SsoStateInvalid(log_detail="the login-attempt cookie does not open with this state") from None
    if not isinstance(attempt, dict):
        raise SsoStateInvalid(log_detail="malformed login attempt")
    if int(attempt.get("exp", 0)) < time.time():
        raise SsoStateInvalid("This sign-in took longer than ten minutes; start again from the sign-in page.",
                              log_detail="login attempt expired")
    settings = ctx.settings
    if (_normalized(str(attempt.get("issuer"))) != _normalized(settings.oidc_issuer or "")
            or attempt.get("client_id") != settings.oidc_client_id):
        raise SsoStateInvalid(log_detail="the login attempt was made for another provider or client")
    return attempt


def _denied(params: Mapping[str, str]) -> SsoDenied:
    raw = params.get("error", "")
    error = raw if _ERROR_CODE_RE.match(raw) else "invalid_error_code"
    description = re.sub(r"[^\w .,:;'()/-]", "", params.get("error_description", ""))[:200]
    if error == "access_denied":
        message = "The sign-in was declined at the identity provider. Start again if that was a mistake."
    elif error in ("login_required", "interaction_required", "consent_required"):
        message = "The identity provider needs you to sign in there first; start again from the sign-in page."
    else:
        message = f"The identity provider did not sign you in ({error}). Try again, or ask an operator."
    return SsoDenied(message, log_detail=f"provider error {error}: {description}")


def _token_request(settings: Settings, meta: ProviderMetadata, code: str, attempt: Mapping[str, Any]) -> dict[str, Any]:
    secret = settings.oidc_client_secret.get_secret_value() if settings.oidc_client_secret else ""
    if not secret:
        method = "none"
    elif "client_secret_basic" in meta.token_auth_methods or "client_secret_post" not in meta.token_auth_methods:
        method = "client_secret_basic"
    else:
        method = "client_secret_post"
    body = prepare_token_request("authorization_code", code=code, redirect_uri=str(attempt["redirect_uri"]),
                                 code_verifier=str(attempt["verifier"]))
    headers = {"Content-Type": "application/x-www-form-urlencoded"}
    _uri, headers, body = ClientAuth(settings.oidc_client_id, secret or None, method).prepare(
        "POST", meta.token_endpoint, headers, body)
    try:
        with _client(settings) as client:
            answer = client.post(meta.token_endpoint, content=body, headers=headers)
    except httpx.HTTPError as exc:
        raise SsoUnavailable(log_detail=f"token endpoint: {type(exc).__name__}") from None
    try:
        doc = answer.json()
    except ValueError:
        doc = None
    if not isinstance(doc, dict):
        if answer.status_code >= 500:
            raise SsoUnavailable(log_detail=f"token endpoint: HTTP {answer.status_code}")
        raise SsoTokenExchangeFailed(log_detail=f"token endpoint: HTTP {answer.status_code}, not a JSON object")
    if answer.status_code != 200 or "error" in doc:
        error = str(doc.get("error", ""))
        error = error if _ERROR_CODE_RE.match(error) else "?"
        description = re.sub(r"[^\w .,:;'()/-]", "", str(doc.get("error_description", "")))[:200]
        raise SsoTokenExchangeFailed(log_detail=f"token endpoint: HTTP {answer.status_code} {error}: {description}")
    if not isinstance(doc.get("id_token"), str):
        raise SsoIdTokenInvalid(log_detail="the token response has no id_token (is 'openid' among the scopes?)")
    return doc


def _verify_id_token(settings: Settings, meta: ProviderMetadata, id_token: str, nonce: str,
                     access_token: str | None) -> dict[str, Any]:
    keys = _keys(settings, meta)
    try:
        try:
            token = jwt.decode(id_token, keys, algorithms=list(meta.id_token_algs))
        except InvalidKeyIdError:  # the provider rotated its keys: fetch the set again, once
            token = jwt.decode(id_token, _keys(settings, meta, refresh=True), algorithms=list(meta.id_token_algs))
    except (JoseError, ValueError, TypeError, KeyError) as exc:
        raise SsoIdTokenInvalid(log_detail=f"id_token signature: {type(exc).__name__}") from None
    options: dict[str, Any] = {
        "iss": {"essential": True, "value": meta.issuer},
        "aud": {"essential": True, "value": settings.oidc_client_id},
        "sub": {"essential": True},
        "exp": {"essential": True},
        "iat": {"essential": True},
        "nonce": {"essential": True},
    }
    params = {"nonce": nonce, "client_id": settings.oidc_client_id, "access_token": access_token}
    claims = CodeIDToken(token.claims, token.header, options, params)
    try:
        claims.validate(leeway=CLOCK_LEEWAY_S)
    except (JoseError, AuthlibBaseError, ValueError, TypeError) as exc:
        claim = getattr(exc, "claim", "") or ""
        raise SsoIdTokenInvalid(log_detail=f"id_token claims: {type(exc).__name__} {claim}".rstrip()) from None
    subject = claims.get("sub")
    if not isinstance(subject, str) or not 0 < len(subject) <= 255:
        raise SsoIdTokenInvalid(log_detail="id_token: sub is not a string of 1-255 characters")
    return dict(claims)


def _with_userinfo(settings: Settings, meta: ProviderMetadata, claims: dict[str, Any],
                   access_token: str | None) -> dict[str, Any]:
    """Providers that keep profile claims out of the ID token give them at the userinfo endpoint."""
    if ("email" in claims and "preferred_username" in claims) or not meta.userinfo_endpoint or not access_token:
        return claims
    try:
        info = _get_json(settings, meta.userinfo_endpoint, "userinfo",
                         headers={"Authorization": f"Bearer {access_token}"})
    except SsoUnavailable as exc:
        log.warning("single sign-on: userinfo not available; using the ID token's claims",
                    extra={"x_detail": exc.log_detail})
        return claims
    if info.get("sub") != claims["sub"]:  # OpenID Connect Core 5.3.2
        log.warning("single sign-on: userinfo is about another subject; ignored")
        return claims
    merged = dict(claims)
    for name in ("email", "email_verified", "preferred_username", "name"):
        if name not in merged and name in info:
            merged[name] = info[name]
    return merged


def complete_login(ctx: AppContext, *, params: Mapping[str, str], cookies: Mapping[str, str]) -> LoginResult:
    """Check the provider's answer (the callback's query) and return the user it signs in.

    Raises an ``SsoError`` for a missing or foreign state, an expired attempt, a provider error, a
    failed code exchange, an ID token that does not verify, or an account that may not sign in;
    then nothing has been written.
    """
    settings = ctx.settings
    if not settings.oidc_enabled:
        raise SsoNotConfigured()
    state = params.get("state", "")
    if not state or len(state) > 512:
        raise SsoStateInvalid(log_detail="the callback has no state")
    attempt = _open_attempt(ctx, state, cookies)
    if "error" in params:
        raise _denied(params)
    code = params.get("code", "")
    if not code or len(code) > 4096:
        raise SsoCallbackInvalid(log_detail="the callback has neither code nor error")
    meta = metadata(settings)
    # RFC 9207: the authorization response names its issuer (defends against provider mix-up).
    if ("iss" in params or meta.iss_parameter_supported) and params.get("iss") != meta.issuer:
        raise SsoCallbackInvalid(log_detail="the callback's iss is not the provider's issuer")
    tokens = _token_request(settings, meta, code, attempt)
    access_token = tokens.get("access_token") if isinstance(tokens.get("access_token"), str) else None
    claims = _verify_id_token(settings, meta, tokens["id_token"], str(attempt["nonce"]), access_token)
    claims = _with_userinfo(settings, meta, claims, access_token)
    # Identities are keyed by the issuer without a trailing slash (the same however it is spelled).
    issuer = _normalized(meta.issuer)
    principal, created = _map_user(ctx, issuer, claims)
    log.info("dashboard single sign-on", extra={"user_id": principal.user_id, "x_issuer": issuer,
                                                "x_created": created})
    return LoginResult(principal, str(attempt.get("next") or "/dashboard"), created, issuer)


# ----------------------------------------------------------------------------------------------
# Identities and users


def _csv(value: str) -> set[str]:
    return {item.strip().lower() for item in value.split(",") if item.strip()}


def _verified_email(claims: Mapping[str, Any]) -> str | None:
    email = claims.get("email")
    verified = claims.get("email_verified")
    if isinstance(email, str) and "@" in email and (verified is True or verified == "true"):
        return email.strip().lower()
    return None


def _name_base(claims: Mapping[str, Any]) -> str:
    for candidate in (claims.get("preferred_username"), str(claims.get("email") or "").split("@")[0],
                      claims.get("name")):
        if not isinstance(candidate, str):
            continue
        name = re.sub(r"[^a-z0-9._-]+", "-", candidate.strip().lower())
        name = re.sub(r"^[^a-z0-9]+", "", name)[:56].rstrip("-.")
        if name:
            return name
    return "user"


def _free_name(session: Session, base: str) -> str:
    """``base``, or ``base-2``, ``base-3``, ...: a new user never takes an existing user's name."""
    taken = set(session.scalars(select(User.name).where(User.name.startswith(base))))
    if base not in taken:
        return base
    for number in range(2, 1000):
        if f"{base}-{number}" not in taken:
            return f"{base}-{number}"
    return f"{base}-{secrets.token_hex(3)}"


def _map_user(ctx: AppContext, issuer: str, claims: Mapping[str, Any]) -> tuple[Principal, bool]:
    settings = ctx.settings
    subject = str(claims["sub"])
    email = claims.get("email") if isinstance(claims.get("email"), str) else None
    verified = _verified_email(claims)
    make_admin = verified is not None and verified in _csv(settings.oidc_admin_emails)
    for _attempt in range(3):
        try:
            with ctx.db.transaction() as session:
                found = session.execute(
                    select(UserIdentity, User).join(User, User.id == UserIdentity.user_id)
                    .where(UserIdentity.issuer == issuer, UserIdentity.subject == subject)
                ).one_or_none()
                if found is not None:
                    identity, user = found
                    if user.disabled:
                        raise SsoAccountDisabled(log_detail=f"user {user.name} is disabled")
                    identity.last_login_at = utcnow()
                    identity.email = email[:320] if email else None
                    if make_admin and not user.is_admin:
                        user.is_admin = True
                        record_event(session, module="sso", kind="user.admin_granted", user_id=user.id,
                                     message=f"{user.name} is an admin (REMOTECLI_OIDC_ADMIN_EMAILS)")
                    return Principal(user.id, user.name, user.is_admin), False
                if not settings.oidc_auto_create_users:
                    raise SsoNoAccount(log_detail="unknown identity and REMOTECLI_OIDC_AUTO_CREATE_USERS is off")
                domains = _csv(settings.oidc_allowed_email_domains)
                if domains and (verified is None or verified.rsplit("@", 1)[1] not in domains):
                    raise SsoNoAccount(
                        "Your account at the identity provider may not use this controller (its verified email "
                        "is not in an allowed domain); ask an operator.",
                        log_detail="unknown identity without a verified email in REMOTECLI_OIDC_ALLOWED_EMAIL_DOMAINS")
                name = _free_name(session, _name_base(claims))
                now = utcnow()
                user = User(id=str(uuid.uuid4()), name=name, is_admin=make_admin, created_at=now)
                session.add(user)
                session.flush()
                session.add(UserIdentity(id=str(uuid.uuid4()), user_id=user.id, issuer=issuer, subject=subject,
                                         email=email[:320] if email else None, created_at=now, last_login_at=now))
                session.flush()
                record_event(session, module="sso", kind="user.created", user_id=user.id,
                             message=f"User {name} created at their first single sign-on",
                             details={"admin": make_admin, "via": "oidc", "issuer": issuer})
                return Principal(user.id, user.name, user.is_admin), True
        except IntegrityError:
            continue  # a concurrent first sign-in of the same identity, or a name taken meanwhile: look again
    raise SsoNoAccount("Your account could not be created just now; try again.",
                       log_detail="three conflicting inserts in a row")


def link_identity(db: Database, name: str, subject: str, issuer: str) -> UserIdentity:
    """Link user ``name`` to the provider account (``issuer``, ``subject``): the operator's explicit merge."""
    if not subject or len(subject) > 255:
        raise InvalidInput("A subject ('sub' claim) is 1-255 characters.")
    issuer = _normalized(issuer.strip())
    user = get_user_by_name(db, name)
    identity = UserIdentity(id=str(uuid.uuid4()), user_id=user.id, issuer=issuer, subject=subject,
                            created_at=utcnow())
    try:
        with db.transaction() as session:
            session.add(identity)
            session.flush()
            record_event(session, module="sso", kind="user.sso_linked", user_id=user.id,
                         message=f"{name} linked to a single sign-on identity", details={"issuer": issuer})
    except IntegrityError:
        raise AlreadyExists("That identity is already linked to a user; unlink it first.") from None
    return identity


def unlink_identities(db: Database, name: str) -> int:
    """Remove every SSO identity of user ``name`` (their SSO sign-ins stop; a user without a password
    then has no way into the dashboard, and their open dashboard sessions end)."""
    user = get_user_by_name(db, name)
    with db.transaction() as session:
        rows = list(session.scalars(select(UserIdentity).where(UserIdentity.user_id == user.id)))
        for row in rows:
            session.delete(row)
        if rows:
            record_event(session, module="sso", kind="user.sso_unlinked", user_id=user.id,
                         message=f"{name}'s single sign-on identities removed", details={"count": len(rows)})
    return len(rows)


def identities(db: Database) -> list[tuple[UserIdentity, str]]:
    """Every linked identity with its user's name."""
    with db.read() as session:
        return [(identity, name) for identity, name in session.execute(
            select(UserIdentity, User.name).join(User, User.id == UserIdentity.user_id).order_by(User.name))]


def has_identity(session: Session, user_id: str) -> bool:
    count = session.scalar(select(func.count()).select_from(UserIdentity).where(UserIdentity.user_id == user_id))
    return bool(count)
