"""``GET /v1/credentials/health``: what the three CLIs' credential files in a user's home say now.

The guest parses the files; only metadata leaves it (state, sign-in method, account, access-token
expiry, when the file was last written or the tokens obtained, whether a refresh token is there).
No token, key or part of one is ever in the answer or the agent's log.

Files read, relative to the user's home (as the CLIs of the pinned releases write them):

- Claude Code: ``.claude/.credentials.json`` (``claudeAiOauth``: ``accessToken``, ``refreshToken``,
  ``expiresAt`` in ms) and ``.claude.json`` (``oauthAccount.emailAddress``); a key sign-in's
  ``CLAUDE_CODE_OAUTH_TOKEN`` or ``ANTHROPIC_API_KEY`` in the environment file ``CLI_ENV_FILE``.
- Codex: ``.codex/auth.json`` (``auth_mode`` ``chatgpt`` with ``tokens`` and ``last_refresh``, or
  ``apikey`` with ``OPENAI_API_KEY``).
- Gemini CLI: ``.gemini/settings.json`` (``security.auth.selectedType``), ``.gemini/oauth_creds.json``
  (``access_token``, ``refresh_token``, ``expiry_date`` in ms), ``.gemini/google_accounts.json``
  (``active``); with ``gemini-api-key``, ``GEMINI_API_KEY`` in ``CLI_ENV_FILE``.

``inspect_home`` takes a ``read(relative_path) -> (bytes, mtime) | None`` so the same parser serves
the real agent (files on disk, opened without following a final symlink and only when owned by the
user or root) and the fake driver of the unit tests.
"""

import base64
import binascii
import datetime
import json
import os
import stat
import time

from .wire import CLI_ENV_FILE

MAX_CREDENTIAL_FILE = 1024 * 1024

SIGNED_IN = "signed_in"
EXPIRED_REFRESHABLE = "expired_refreshable"
EXPIRED = "expired"
SIGNED_OUT = "signed_out"
UNREADABLE = "unreadable"

PROVIDERS = ("claude_code", "codex", "gemini")


class _Unreadable(Exception):
    pass


def disk_reader(home, uid):
    """A reader of files under ``home`` for ``inspect_home``: None when missing, ``_Unreadable``
    when not a regular file, a symlink, too large, or owned by someone other than ``uid``/root."""

    def read(relative):
        path = os.path.join(home, relative)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NOCTTY | os.O_NONBLOCK)
        except FileNotFoundError:
            return None
        except NotADirectoryError:
            return None
        except OSError as exc:
            raise _Unreadable(f"cannot open ({exc.strerror})") from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise _Unreadable("not a regular file")
            if st.st_uid not in (uid, 0):
                raise _Unreadable("not owned by the user")
            if st.st_size > MAX_CREDENTIAL_FILE:
                raise _Unreadable("too large")
            data = os.read(fd, MAX_CREDENTIAL_FILE + 1)
        except OSError as exc:
            raise _Unreadable(f"cannot read ({exc.strerror})") from None
        finally:
            os.close(fd)
        return data, st.st_mtime

    return read


def _json(read, relative):
    """(document or None, mtime or None); ``_Unreadable`` if present but not a JSON object."""
    found = read(relative)
    if found is None:
        return None, None
    data, mtime = found
    if not data.strip():
        return {}, mtime  # emptied (a CLI that signed out may leave an empty file)
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        raise _Unreadable("not JSON") from None
    if not isinstance(doc, dict):
        raise _Unreadable("not a JSON object")
    return doc, mtime


def parse_env_file(data):
    """Names and values of ``export NAME='value'`` / ``NAME=value`` lines (values stay in the guest)."""
    found = {}
    for raw in data.decode("utf-8", "replace").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        line = line.removeprefix("export ").strip()
        name, sep, value = line.partition("=")
        if not sep or not name.isidentifier():
            continue
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        found[name] = value
    return found


def _env(read):
    found = read(CLI_ENV_FILE)
    if found is None:
        return {}, None
    data, mtime = found
    return parse_env_file(data), mtime


def _jwt_claims(token):
    if not isinstance(token, str) or token.count(".") != 2:
        return {}
    payload = token.split(".")[1]
    try:
        doc = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    except (binascii.Error, ValueError):
        return {}
    return doc if isinstance(doc, dict) else {}


def _number(value):
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def _rfc3339(value):
    if not isinstance(value, str) or not value:
        return None
    try:
        moment = datetime.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=datetime.UTC)
    return moment.timestamp()


def _entry(provider, state, **fields):
    entry = {
        "provider": provider,
        "state": state,
        "method": None,
        "account": None,
        "access_expires_at": None,
        "refreshed_at": None,
        "has_refresh_token": False,
        "source": None,
        "detail": None,
    }
    entry.update(fields)
    return entry


def _oauth_state(provider, now, access, refresh, expires_at, **fields):
    """The state of an OAuth credential from what is there: an access token that has not expired
    is signed in; an expired one is refreshable when a refresh token is there."""
    has_refresh = isinstance(refresh, str) and bool(refresh)
    if not isinstance(access, str) or not access:
        if has_refresh:
            return _entry(provider, EXPIRED_REFRESHABLE, method="oauth", has_refresh_token=True,
                          detail="no access token; the CLI will refresh it", **fields)
        return _entry(provider, SIGNED_OUT, detail="the CLI's tokens are cleared", **fields)
    if expires_at is not None and expires_at <= now:
        state = EXPIRED_REFRESHABLE if has_refresh else EXPIRED
        return _entry(provider, state, method="oauth", access_expires_at=expires_at,
                      has_refresh_token=has_refresh, **fields)
    return _entry(provider, SIGNED_IN, method="oauth", access_expires_at=expires_at,
                  has_refresh_token=has_refresh, **fields)


def _claude(read, env, env_mtime, now):
    if env.get("CLAUDE_CODE_OAUTH_TOKEN"):
        return _entry("claude_code", SIGNED_IN, method="oauth_token", refreshed_at=env_mtime,
                      source=CLI_ENV_FILE, detail="long-lived token (claude setup-token) in the environment")
    if env.get("ANTHROPIC_API_KEY"):
        return _entry("claude_code", SIGNED_IN, method="api_key", refreshed_at=env_mtime,
                      source=CLI_ENV_FILE, detail="Anthropic API key in the environment")
    source = ".claude/.credentials.json"
    doc, mtime = _json(read, source)
    if doc is None:
        return _entry("claude_code", SIGNED_OUT, detail="no credentials file")
    oauth = doc.get("claudeAiOauth")
    oauth = oauth if isinstance(oauth, dict) else {}
    account = None
    try:
        profile, _ = _json(read, ".claude.json")
    except _Unreadable:
        profile = None
    if isinstance(profile, dict) and isinstance(profile.get("oauthAccount"), dict):
        email = profile["oauthAccount"].get("emailAddress")
        account = email if isinstance(email, str) and email else None
    expires_ms = _number(oauth.get("expiresAt"))
    return _oauth_state("claude_code", now, oauth.get("accessToken"), oauth.get("refreshToken"),
                        expires_ms / 1000 if expires_ms is not None else None,
                        account=account, refreshed_at=mtime, source=source)


def _codex(read, now):
    source = ".codex/auth.json"
    doc, mtime = _json(read, source)
    if doc is None:
        return _entry("codex", SIGNED_OUT, detail="no credentials file")
    key = doc.get("OPENAI_API_KEY")
    tokens = doc.get("tokens")
    tokens = tokens if isinstance(tokens, dict) else {}
    if isinstance(key, str) and key and (doc.get("auth_mode") in (None, "apikey") or not tokens):
        return _entry("codex", SIGNED_IN, method="api_key", refreshed_at=mtime, source=source,
                      detail="OpenAI API key (codex login --with-api-key)")
    claims = _jwt_claims(tokens.get("id_token"))
    profile = claims.get("https://api.openai.com/profile")
    email = claims.get("email")
    if not isinstance(email, str) and isinstance(profile, dict):
        email = profile.get("email")
    access = tokens.get("access_token")
    expires_at = _number(_jwt_claims(access).get("exp"))
    refreshed = _rfc3339(doc.get("last_refresh"))
    return _oauth_state("codex", now, access, tokens.get("refresh_token"), expires_at,
                        account=email if isinstance(email, str) and email else None,
                        refreshed_at=refreshed if refreshed is not None else mtime, source=source)


def _gemini(read, env, env_mtime, now):
    try:
        settings, _ = _json(read, ".gemini/settings.json")
    except _Unreadable:
        settings = None
    selected = None
    if isinstance(settings, dict):
        auth = (settings.get("security") or {}).get("auth") if isinstance(settings.get("security"), dict) else None
        selected = auth.get("selectedType") if isinstance(auth, dict) else None
    if selected == "gemini-api-key":
        if env.get("GEMINI_API_KEY"):
            return _entry("gemini", SIGNED_IN, method="api_key", refreshed_at=env_mtime, source=CLI_ENV_FILE,
                          detail="Gemini API key in the environment")
        return _entry("gemini", SIGNED_OUT, detail="API key sign-in selected but no GEMINI_API_KEY")
    source = ".gemini/oauth_creds.json"
    doc, mtime = _json(read, source)
    if doc is None:
        return _entry("gemini", SIGNED_OUT, detail="no credentials file")
    account = None
    try:
        accounts, _ = _json(read, ".gemini/google_accounts.json")
    except _Unreadable:
        accounts = None
    if isinstance(accounts, dict) and isinstance(accounts.get("active"), str) and accounts["active"]:
        account = accounts["active"]
    else:
        email = _jwt_claims(doc.get("id_token")).get("email")
        account = email if isinstance(email, str) and email else None
    expires_ms = _number(doc.get("expiry_date"))
    entry = _oauth_state("gemini", now, doc.get("access_token"), doc.get("refresh_token"),
                         expires_ms / 1000 if expires_ms is not None else None,
                         account=account, refreshed_at=mtime, source=source)
    if entry["state"] != SIGNED_OUT and selected != "oauth-personal":
        entry["detail"] = "no auth method set in ~/.gemini/settings.json (the CLI will ask for one)"
    return entry


def inspect_home(read, now=None):
    """One entry per provider (``PROVIDERS``), metadata only."""
    now = time.time() if now is None else now
    try:
        env, env_mtime = _env(read)
    except _Unreadable:
        env, env_mtime = {}, None
    checks = {
        "claude_code": lambda: _claude(read, env, env_mtime, now),
        "codex": lambda: _codex(read, now),
        "gemini": lambda: _gemini(read, env, env_mtime, now),
    }
    entries = []
    for provider in PROVIDERS:
        try:
            entries.append(checks[provider]())
        except _Unreadable as exc:
            entries.append(_entry(provider, UNREADABLE, detail=str(exc)))
    return entries
