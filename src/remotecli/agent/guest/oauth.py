"""The OAuth agent of Browser VMs: authorization-code flows with PKCE, loopback redirect, Chromium.

One ``Flow`` per ``POST /v1/oauth/flows``: a loopback HTTP listener on the redirect port (RFC 8252
section 7.3), an authorize URL with ``state`` and a PKCE S256 challenge (RFC 7636), Chromium on the
VM's X display at that URL (its DevTools endpoint tells us when the sign-in page is shown), and on
the one valid callback the code exchange at the token endpoint. The controller polls
``GET /v1/oauth/flows/{id}`` and reads ``result`` (the token response) once ``completed``, then
``DELETE``s the flow, which stops the listener and Chromium and forgets the result.

A warm-pool Browser VM (ADR 0012) starts Chromium before any flow: ``POST /v1/oauth/browser``
runs it on a near-blank page served over loopback HTTP by the agent itself (so Chromium's network
stack, HTTP cache, cookie store, fonts and a renderer's parse-layout-paint path have all run once
before the user waits) and answers once that page is loaded. The next flow with the same browser
settings takes that browser over (it is then the flow's, stopped with it) and points its page at
the authorize URL through the DevTools protocol, instead of starting Chromium then.

Standard library only (see docs/decisions/0001). Never log or answer with codes, tokens, the PKCE
verifier or the state: logs carry the flow id, status changes, ports and counts only, and
``page_url`` is reduced to scheme, host and path (a callback URL's query holds the code).
"""

import asyncio
import base64
import contextlib
import hashlib
import hmac
import html
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from urllib.parse import parse_qs, urlencode, urlsplit, urlunsplit

from .httpio import HttpError
from .log import log
from .users import process_identity
from .wire import (
    OAUTH_STATUS_AWAITING_USER,
    OAUTH_STATUS_COMPLETED,
    OAUTH_STATUS_DENIED,
    OAUTH_STATUS_EXCHANGING,
    OAUTH_STATUS_FAILED,
    OAUTH_STATUS_PAGE_LOADING,
    OAUTH_STATUS_STARTING,
    PATH_OAUTH_BROWSER,
    PATH_OAUTH_FLOWS,
)

FLOWS_PATH = PATH_OAUTH_FLOWS
BROWSER_PATH = PATH_OAUTH_BROWSER
DEFAULT_WARM_TIMEOUT_S = 90.0

STARTING = OAUTH_STATUS_STARTING
PAGE_LOADING = OAUTH_STATUS_PAGE_LOADING
AWAITING_USER = OAUTH_STATUS_AWAITING_USER
EXCHANGING = OAUTH_STATUS_EXCHANGING
COMPLETED = OAUTH_STATUS_COMPLETED
DENIED = OAUTH_STATUS_DENIED
FAILED = OAUTH_STATUS_FAILED
TERMINAL = frozenset({COMPLETED, DENIED, FAILED})

DEFAULT_DEBUG_PORT = 9222
DEFAULT_EXPIRES_IN_S = 1800.0
DEFAULT_PAGE_LOAD_TIMEOUT_S = 120.0
TOKEN_TIMEOUT_S = 30.0
MAX_TOKEN_RESPONSE = 1024 * 1024
POLL_INTERVAL_S = 0.25
# While the sign-in page loads, the page list is read more often: awaiting_user is what the user
# waits for, and one read costs the browser a few milliseconds.
PAGE_POLL_INTERVAL_S = 0.1
WARM_TITLE = "Opening the sign-in page"
CALLBACK_HEAD_LIMIT = 16 * 1024
CALLBACK_READ_TIMEOUT_S = 10.0

_FLOW_ID = re.compile(r"^[A-Za-z0-9._-]{1,128}$")

# Chromium must not call home from a Browser VM (and cannot: the VM's network is the user's sign-in
# only); these switch off the background services that would try.
QUIET_FLAGS = (
    "--no-first-run",
    "--no-default-browser-check",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-quic",
    "--disable-default-apps",
    "--disable-domain-reliability",
    "--disable-client-side-phishing-detection",
    "--disable-breakpad",
    "--metrics-recording-only",
    "--disable-features=Translate,OptimizationHints,MediaRouter,DialMediaRouteProvider",
    "--password-store=basic",
    "--use-mock-keychain",
)

_PAGE_STYLE = (
    "body{font-family:sans-serif;background:#f3f4f6;margin:0}"
    "main{max-width:480px;margin:96px auto;background:#fff;padding:32px;border-radius:8px}"
)


def _html_page(title, text):
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        f"<title>{html.escape(title)}</title><style>{_PAGE_STYLE}</style></head>"
        f"<body><main><h1>{html.escape(title)}</h1><p>{html.escape(text)}</p></main></body></html>"
    ).encode()


def _b64url(data):
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _public_url(url):
    """scheme://host/path of a URL: its query and fragment may carry a code or the state."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return None
    if not parts.scheme:
        return None
    return urlunsplit((parts.scheme, parts.netloc, parts.path, "", ""))


def _short(text, limit=200):
    text = "".join(ch if ch.isprintable() else " " for ch in str(text))
    return text[:limit]


# -- request validation ------------------------------------------------------------------------


def _require_str(doc, name, optional=False):
    value = doc.get(name)
    if value is None and optional:
        return None
    if not isinstance(value, str) or not value or "\0" in value:
        raise HttpError(400, "invalid_request", f"{name} must be a non-empty string.")
    return value


def _require_url(doc, name):
    value = _require_str(doc, name)
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise HttpError(400, "invalid_request", f"{name} must be an http(s) URL.")
    return value


def _number(doc, name, default, low, high):
    value = doc.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
        raise HttpError(400, "invalid_request", f"{name} must be a number in [{low}, {high}].")
    return float(value)


class FlowSpec:
    """A validated ``POST /v1/oauth/flows`` body."""

    def __init__(self, doc):
        self.flow_id = _require_str(doc, "flow_id")
        if not _FLOW_ID.match(self.flow_id):
            raise HttpError(400, "invalid_request", "flow_id must match [A-Za-z0-9._-]{1,128}.")
        self.authorize_url = _require_url(doc, "authorize_url")
        self.token_url = _require_url(doc, "token_url")
        self.client_id = _require_str(doc, "client_id")
        self.client_secret = _require_str(doc, "client_secret", optional=True)
        scopes = doc.get("scopes", [])
        if not isinstance(scopes, list) or not all(isinstance(s, str) and s and " " not in s for s in scopes):
            raise HttpError(400, "invalid_request", "scopes must be a list of scope strings.")
        self.scopes = scopes
        redirect = doc.get("redirect")
        if not isinstance(redirect, dict):
            raise HttpError(400, "invalid_request", "redirect must be an object {host, port, path}.")
        self.redirect_host = redirect.get("host", "127.0.0.1")
        if self.redirect_host not in ("localhost", "127.0.0.1"):
            raise HttpError(400, "invalid_request", "redirect.host must be 'localhost' or '127.0.0.1'.")
        port = redirect.get("port", 0)
        if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
            raise HttpError(400, "invalid_request", "redirect.port must be an integer in [0, 65535].")
        self.redirect_port = port
        path = redirect.get("path", "/callback")
        if not isinstance(path, str) or not path.startswith("/") or "?" in path or "#" in path:
            raise HttpError(400, "invalid_request", "redirect.path must be an absolute path.")
        self.redirect_path = path
        pkce = doc.get("pkce", True)
        if not isinstance(pkce, bool):
            raise HttpError(400, "invalid_request", "pkce must be true or false.")
        self.pkce = pkce
        extra = doc.get("extra_authorize_params") or {}
        if not isinstance(extra, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in extra.items()):
            raise HttpError(400, "invalid_request", "extra_authorize_params must map names to strings.")
        self.extra_authorize_params = extra
        style = doc.get("token_request_style", "form")
        if style not in ("form", "json"):
            raise HttpError(400, "invalid_request", "token_request_style must be 'form' or 'json'.")
        self.token_request_style = style
        browser = BrowserSpec(doc.get("browser") or {})
        self.display = browser.display
        self.browser_user = browser.browser_user
        self.executable = browser.executable
        self.extra_args = browser.extra_args
        self.app_window = browser.app_window
        self.browser_key = browser.key
        self.expires_in_s = _number(doc, "expires_in_s", DEFAULT_EXPIRES_IN_S, 1, 24 * 3600)
        self.page_load_timeout_s = _number(doc, "page_load_timeout_s", DEFAULT_PAGE_LOAD_TIMEOUT_S, 1, 3600)


class BrowserSpec:
    """The ``browser`` object of a flow or of ``POST /v1/oauth/browser``: how Chromium is run."""

    def __init__(self, browser):
        if not isinstance(browser, dict):
            raise HttpError(400, "invalid_request", "browser must be an object.")
        self.display = browser.get("display", ":0")
        if not isinstance(self.display, str) or not re.match(r"^[A-Za-z0-9.\-]*:\d+(\.\d+)?$", self.display):
            raise HttpError(400, "invalid_request", "browser.display must look like ':0'.")
        self.browser_user = browser.get("user", "browser")
        if self.browser_user is not None and (not isinstance(self.browser_user, str) or not self.browser_user):
            raise HttpError(400, "invalid_request", "browser.user must be a user name or null.")
        self.executable = browser.get("executable", "chromium")
        if not isinstance(self.executable, str) or not self.executable:
            raise HttpError(400, "invalid_request", "browser.executable must be a program name.")
        extra_args = browser.get("extra_args") or []
        if not isinstance(extra_args, list) or not all(
            isinstance(a, str) and a.startswith("--") and "\0" not in a for a in extra_args
        ):
            raise HttpError(400, "invalid_request", "browser.extra_args must be a list of --switches.")
        self.extra_args = extra_args
        app = browser.get("app", True)
        if not isinstance(app, bool):
            raise HttpError(400, "invalid_request", "browser.app must be true or false.")
        self.app_window = app
        # A warm browser serves a flow only when the flow would have run the very same one.
        self.key = (self.display, self.browser_user, self.executable, tuple(self.extra_args), self.app_window)


# -- one flow ----------------------------------------------------------------------------------


class Flow:
    def __init__(self, spec):
        self.spec = spec
        self.flow_id = spec.flow_id
        self.status = STARTING
        self.error_code = None
        self.error_message = None
        self.page_url = None
        self.page_title = None
        self.refused_callbacks = 0
        self.result = None
        self.redirect_uri = None
        self.authorize_host = urlsplit(spec.authorize_url).netloc.lower()
        self._state = _b64url(secrets.token_bytes(32))
        self._verifier = _b64url(secrets.token_bytes(48)) if spec.pkce else None  # 64 characters
        self._callback_taken = False
        self._servers = []
        self._process = None
        self._debug_port = None
        self._profile_dir = None
        self._monitor = None
        self._expiry = None
        self._started = time.monotonic()
        self._closed = False
        self._warm_origin = None

    # -- state ------------------------------------------------------------------------------

    def _set_status(self, status, error_code=None, error_message=None):
        if self.status in TERMINAL or self.status == status:
            return
        self.status = status
        if error_code is not None:
            self.error_code = error_code
            self.error_message = error_message
        log(
            "oauth_status",
            flow=self.flow_id,
            status=status,
            error_code=error_code,
            elapsed_s=round(time.monotonic() - self._started, 3),
        )

    def describe(self):
        doc = {
            "flow_id": self.flow_id,
            "status": self.status,
            "error_code": self.error_code,
            "error_message": self.error_message,
            "page_url": self.page_url,
            "page_title": self.page_title,
            "refused_callbacks": self.refused_callbacks,
            "redirect_uri": self.redirect_uri,
        }
        if self.status == COMPLETED and self.result is not None:
            doc["result"] = dict(self.result)
        else:
            doc["result"] = None
        return doc

    # -- start ------------------------------------------------------------------------------

    async def start(self, warm=None):
        try:
            await self._listen()
            if warm is None or not await self._adopt(warm):
                self._launch_browser()
        except BaseException:
            await self.close()
            raise
        self._set_status(PAGE_LOADING)
        loop = asyncio.get_running_loop()
        self._monitor = loop.create_task(self._watch_browser())
        self._expiry = loop.call_later(self.spec.expires_in_s, self._expire)

    async def _listen(self):
        spec = self.spec
        try:
            server = await asyncio.start_server(
                self._handle_callback, "127.0.0.1", spec.redirect_port, limit=CALLBACK_HEAD_LIMIT
            )
        except OSError as exc:
            raise HttpError(
                409, "port_in_use", f"The redirect port {spec.redirect_port} is not free in the VM: {exc.strerror}."
            ) from None
        self._servers.append(server)
        port = server.sockets[0].getsockname()[1]
        if spec.redirect_host == "localhost" and socket.has_ipv6:
            # Browsers may resolve localhost to ::1 first; serve it there too when the guest has it.
            try:
                v6 = await asyncio.start_server(self._handle_callback, "::1", port, limit=CALLBACK_HEAD_LIMIT)
                self._servers.append(v6)
            except OSError:
                pass
        self.redirect_uri = f"http://{spec.redirect_host}:{port}{spec.redirect_path}"
        log("oauth_listening", flow=self.flow_id, port=port, ipv6=len(self._servers) > 1)

    def authorize_url(self):
        spec = self.spec
        params = {
            "response_type": "code",
            "client_id": spec.client_id,
            "redirect_uri": self.redirect_uri,
            "state": self._state,
        }
        if spec.scopes:
            params["scope"] = " ".join(spec.scopes)
        if self._verifier is not None:
            digest = hashlib.sha256(self._verifier.encode("ascii")).digest()
            params["code_challenge"] = _b64url(digest)
            params["code_challenge_method"] = "S256"
        for key, value in spec.extra_authorize_params.items():
            params.setdefault(key, value)
        parts = urlsplit(spec.authorize_url)
        query = parts.query + ("&" if parts.query else "") + urlencode(params)
        return urlunsplit((parts.scheme, parts.netloc, parts.path, query, ""))

    async def _adopt(self, warm):
        """Take over the warm browser and load the authorize URL in its page; False (the warm
        browser stopped and removed) when that did not work: the caller starts one as before."""
        self._process, self._debug_port, self._profile_dir = warm.process, warm.debug_port, warm.profile_dir
        self._warm_origin = warm.origin  # its page is not the sign-in page
        asked = time.monotonic()
        navigated = warm.process.poll() is None and await asyncio.to_thread(
            _navigate, warm.debug_port, self.authorize_url())
        if navigated:
            log("oauth_browser_adopted", flow=self.flow_id, pid=warm.process.pid, debug_port=warm.debug_port,
                navigate_s=round(time.monotonic() - asked, 3))
            return True
        log("oauth_warm_browser_unusable", level="warning", flow=self.flow_id)
        await self.stop_browser()
        await asyncio.to_thread(shutil.rmtree, warm.profile_dir, True)
        self._process = self._debug_port = self._profile_dir = None
        return False

    def _launch_browser(self):
        url = self.authorize_url()
        self._process, self._debug_port, self._profile_dir = _spawn_browser(
            self.spec, f"--app={url}" if self.spec.app_window else url, f"{self.flow_id[:32]}-")
        log("oauth_browser_started", flow=self.flow_id, pid=self._process.pid, display=self.spec.display,
            debug_port=self._debug_port)

    # -- watching the browser ---------------------------------------------------------------

    async def _watch_browser(self):
        while not self._closed and self.status not in TERMINAL:
            if self._process is not None and self._process.poll() is not None:
                if self.status != EXCHANGING:
                    log("oauth_browser_exited", level="warning", flow=self.flow_id, code=self._process.returncode)
                    self._set_status(FAILED, "browser_failed", "The browser in the sign-in VM closed unexpectedly.")
                return
            pages = await asyncio.to_thread(_devtools_pages, self._debug_port)
            self._observe(pages)
            if self.status == PAGE_LOADING and time.monotonic() - self._started > self.spec.page_load_timeout_s:
                self._set_status(
                    FAILED,
                    "browser_failed",
                    "The sign-in page did not load in time; check that the VM can reach the provider.",
                )
                return
            await asyncio.sleep(PAGE_POLL_INTERVAL_S if self.status == PAGE_LOADING else POLL_INTERVAL_S)

    def _observe(self, pages):
        for page in pages:
            if page.get("type") != "page":
                continue
            url = str(page.get("url") or "")
            title = str(page.get("title") or "")
            parts = urlsplit(url)
            if parts.scheme not in ("http", "https"):
                continue
            if self._warm_origin and f"{parts.scheme}://{parts.netloc}" == self._warm_origin:
                continue  # the warm browser's own page, before the sign-in page commits
            self.page_url = _public_url(url)
            # While loading, and on its own error page (the provider unreachable), Chromium shows
            # the URL (or host/path, with the query) as the title: that is no sign-in page, and
            # the query holds the state.
            bare = html.unescape(title)
            shown = bool(title) and bare not in (url, f"{parts.netloc}{parts.path}", parts.netloc) and not (
                bare.startswith(f"{parts.netloc}{parts.path}?") or bare.startswith(url))
            self.page_title = _short(title) if shown else None
            loopback = parts.port == self._callback_port() and parts.hostname in ("localhost", "127.0.0.1", "::1")
            if self.status == PAGE_LOADING and shown and not loopback:
                self._set_status(AWAITING_USER)
            return

    def _callback_port(self):
        if not self._servers:
            return None
        return self._servers[0].sockets[0].getsockname()[1]

    # -- the loopback callback --------------------------------------------------------------

    async def _handle_callback(self, reader, writer):
        try:
            try:
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), CALLBACK_READ_TIMEOUT_S)
            except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
                return
            line = head.split(b"\r\n", 1)[0].decode("latin-1")
            parts = line.split(" ")
            if len(parts) != 3:
                await _respond(writer, 400, "Bad request", "The request could not be read.")
                return
            method, target, _ = parts
            url = urlsplit(target)
            if url.path != self.spec.redirect_path:
                await _respond(writer, 404, "Not found", "There is nothing here.")
                return
            if method not in ("GET", "HEAD"):
                await _respond(writer, 405, "Not allowed", "Use GET.")
                return
            query = parse_qs(url.query, keep_blank_values=True)
            status, title, text = await self._callback(query)
            await _respond(writer, status, title, text)
        except (ConnectionError, OSError):
            return
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _callback(self, query):
        state = (query.get("state") or [""])[-1]
        if not hmac.compare_digest(state.encode("utf-8", "replace"), self._state.encode("ascii")):
            self.refused_callbacks += 1
            log("oauth_callback_refused", level="warning", flow=self.flow_id, refused=self.refused_callbacks)
            return (
                400,
                "This sign-in link is not valid",
                ("It does not belong to the sign-in that is in progress. Go back to the sign-in page."),
            )
        if self._callback_taken or self.status in TERMINAL:
            return 400, "This sign-in link is not valid", "This sign-in has already been used."
        error = (query.get("error") or [None])[-1]
        code = (query.get("code") or [None])[-1]
        if error:
            self._callback_taken = True
            description = (query.get("error_description") or [""])[-1]
            if error == "access_denied":
                self._set_status(DENIED, "access_denied", "You declined the request at the provider.")
                return 200, "Sign-in cancelled", "You declined the request. You can close this window."
            message = f"The provider answered {_short(error, 64)}" + (
                f": {_short(description)}" if description else "."
            )
            self._set_status(FAILED, "oauth_error", message)
            return 200, "Sign-in failed", f"{message} You can close this window."
        if not code:
            self.refused_callbacks += 1
            log("oauth_callback_refused", level="warning", flow=self.flow_id, refused=self.refused_callbacks)
            return 400, "This sign-in link is not valid", "It carries no authorization code."
        self._callback_taken = True
        self._set_status(EXCHANGING)
        log("oauth_callback_accepted", flow=self.flow_id)
        ok, outcome = await asyncio.to_thread(self._exchange, code)
        if self._closed:
            return 400, "Sign-in cancelled", "This sign-in was cancelled. You can close this window."
        if ok:
            self.result = outcome
            self._set_status(COMPLETED)
            return 200, "You are signed in", "You can close this window."
        self._set_status(FAILED, "token_exchange_failed", outcome)
        return 502, "Sign-in failed", f"{outcome} You can close this window."

    def _exchange(self, code):
        """POST the code to the token endpoint. (True, token response) or (False, message)."""
        spec = self.spec
        fields = {
            "grant_type": "authorization_code",
            "code": code,
            "redirect_uri": self.redirect_uri,
            "client_id": spec.client_id,
        }
        if self._verifier is not None:
            fields["code_verifier"] = self._verifier
        if spec.client_secret:
            fields["client_secret"] = spec.client_secret
        if spec.token_request_style == "json":
            fields["state"] = self._state  # Anthropic's endpoint expects it back with the code
            body = json.dumps(fields).encode("utf-8")
            content_type = "application/json"
        else:
            body = urlencode(fields).encode("ascii")
            content_type = "application/x-www-form-urlencoded"
        request = urllib.request.Request(
            spec.token_url,
            data=body,
            method="POST",
            headers={
                "Content-Type": content_type,
                "Accept": "application/json",
                "User-Agent": "remotecli-oauth-agent",
            },
        )
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        started = time.monotonic()
        try:
            with opener.open(request, timeout=TOKEN_TIMEOUT_S) as answer:
                status = answer.status
                raw = answer.read(MAX_TOKEN_RESPONSE + 1)
        except urllib.error.HTTPError as exc:
            status = exc.code
            raw = b""
            with contextlib.suppress(Exception):
                raw = exc.read(MAX_TOKEN_RESPONSE + 1)
            error = _error_field(raw)
            log("oauth_token_exchange", level="warning", flow=self.flow_id, http_status=status, error=error)
            return False, f"The provider refused the sign-in code (HTTP {status}{', ' + error if error else ''})."
        except (OSError, ValueError) as exc:
            reason = getattr(exc, "reason", exc)
            log("oauth_token_exchange", level="warning", flow=self.flow_id, error=type(exc).__name__)
            return False, f"The provider's token endpoint could not be reached ({_short(reason, 100)})."
        elapsed = round(time.monotonic() - started, 3)
        if len(raw) > MAX_TOKEN_RESPONSE:
            return False, "The provider's token response is too large."
        try:
            doc = json.loads(raw)
        except (UnicodeDecodeError, ValueError):
            doc = None
        if not isinstance(doc, dict) or not isinstance(doc.get("access_token"), str):
            log("oauth_token_exchange", level="warning", flow=self.flow_id, http_status=status, valid=False)
            return False, "The provider's token response has no access token."
        log("oauth_token_exchange", flow=self.flow_id, http_status=status, duration_s=elapsed, fields=sorted(doc))
        doc["obtained_at"] = round(time.time(), 3)
        return True, doc

    # -- end --------------------------------------------------------------------------------

    def _expire(self):
        if self.status in TERMINAL:
            return
        self._set_status(FAILED, "expired", "The sign-in took too long; start it again.")
        asyncio.get_running_loop().create_task(self.stop_browser())

    async def stop_browser(self):
        process = self._process
        if process is not None:
            await asyncio.to_thread(_kill_group, process, self._profile_dir)

    async def close(self):
        """Stop the listener and the browser, remove the profile, forget secrets and the result."""
        self._closed = True
        if self._expiry is not None:
            self._expiry.cancel()
        for server in self._servers:
            server.close()
        self._servers = []
        if self._monitor is not None and not self._monitor.done():
            self._monitor.cancel()
            with contextlib.suppress(BaseException):
                await self._monitor
        await self.stop_browser()
        if self._profile_dir:
            await asyncio.to_thread(shutil.rmtree, self._profile_dir, True)
        self.result = None
        self._state = ""
        self._verifier = None


async def _respond(writer, status, title, text):
    reasons = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed", 502: "Bad Gateway"}
    body = _html_page(title, text)
    head = (
        f"HTTP/1.1 {status} {reasons.get(status, 'Error')}\r\n"
        "Content-Type: text/html; charset=utf-8\r\n"
        f"Content-Length: {len(body)}\r\n"
        "Cache-Control: no-store\r\n"
        "Referrer-Policy: no-referrer\r\n"
        "Connection: close\r\n\r\n"
    ).encode("latin-1")
    writer.write(head + body)
    await writer.drain()


def _error_field(raw):
    try:
        doc = json.loads(raw)
    except (UnicodeDecodeError, ValueError, TypeError):
        return ""
    error = doc.get("error") if isinstance(doc, dict) else None
    if isinstance(error, dict):  # {"error": {"type": ..., "message": ...}} style
        error = error.get("type")
    return _short(error, 64) if isinstance(error, str) else ""


def _devtools_pages(port):
    if port is None:
        return []
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(f"http://127.0.0.1:{port}/json/list", timeout=2) as answer:
            doc = json.loads(answer.read(1024 * 1024))
    except (OSError, ValueError):
        return []
    return [page for page in doc if isinstance(page, dict)] if isinstance(doc, list) else []


def _pick_debug_port():
    """9222 when free (the documented port), otherwise any free loopback port (a second flow)."""
    for port in (DEFAULT_DEBUG_PORT, 0):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
            return probe.getsockname()[1]
    raise HttpError(500, "internal_error", "No free port for the browser's DevTools endpoint.")


def _user_namespaces_available():
    for path, off in (("/proc/sys/kernel/unprivileged_userns_clone", "0"), ("/proc/sys/user/max_user_namespaces", "0")):
        try:
            with open(path) as handle:
                if handle.read().strip() == off:
                    return False
        except OSError:
            continue
    return True


def _kill_group(process, profile_dir):
    """SIGTERM the browser's process group, SIGKILL what is left after 2 s; then strays by profile."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(2)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(2)
    # Helpers that left the group (e.g. crashpad) still name the profile directory on their
    # command line.
    if profile_dir:
        marker = profile_dir.encode()
        for _ in range(2):
            strays = _pids_with_arg(marker)
            for pid in strays:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
            if not strays:
                break
            time.sleep(0.1)


def _pids_with_arg(marker):
    found = []
    me = os.getpid()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as handle:
                if marker in handle.read():
                    found.append(int(entry))
        except OSError:
            continue
    return found


def _spawn_browser(spec, target, prefix):
    """Chromium as ``spec`` (a ``BrowserSpec``-like) says, on ``target`` (a URL, or ``--app=URL``
    for an app window), with a fresh profile; returns ``(process, debug_port, profile_dir)``."""
    executable = shutil.which(spec.executable)
    if executable is None:
        raise HttpError(400, "spawn_failed", f"No browser program {spec.executable!r} in the VM.")
    identity, entry = process_identity(spec.browser_user)
    uid = entry.pw_uid
    profile_dir = tempfile.mkdtemp(prefix=f"remotecli-oauth-{prefix}")
    home = os.path.join(profile_dir, "home")
    profile = os.path.join(profile_dir, "profile")
    default = os.path.join(profile, "Default")
    for path in (home, profile, default):
        os.mkdir(path, 0o700)
    # A fresh profile whose password manager is off: no "Save password?" bubble over the
    # provider's page after the user logs in.
    preferences = os.path.join(default, "Preferences")
    with open(preferences, "w", encoding="utf-8") as handle:
        json.dump({"credentials_enable_service": False,
                   "profile": {"password_manager_enabled": False}}, handle)
    if identity:
        for path in (profile_dir, home, profile, default, preferences):
            os.chown(path, uid, entry.pw_gid)
    debug_port = _pick_debug_port()
    argv = [
        executable,
        *QUIET_FLAGS,
        f"--user-data-dir={profile}",
        f"--remote-debugging-port={debug_port}",
        "--remote-debugging-address=127.0.0.1",
        "--window-position=0,0",
        "--window-size=1280,800",
        "--start-maximized",
        # Guests have a small /dev/shm, and Xvfb has no GPU.
        "--disable-dev-shm-usage",
        "--disable-gpu",
    ]
    if uid == 0 or not _user_namespaces_available():
        # Chromium's sandbox needs unprivileged user namespaces (Debian ships no setuid
        # helper) and refuses to run as root with it. Without it each renderer would be as
        # strong as the browser process; that is acceptable here only because a Browser VM is
        # single-use and the VM itself is the isolation boundary. The image runs Chromium as
        # the unprivileged `browser` user, so this path is for hosts and tests.
        argv.append("--no-sandbox")
    argv.extend(spec.extra_args)
    argv.append(target)
    env = {
        "PATH": os.environ.get("PATH") or "/usr/local/bin:/usr/bin:/bin",
        "HOME": home,
        "USER": entry.pw_name,
        "LOGNAME": entry.pw_name,
        "LANG": os.environ.get("LANG") or "C.UTF-8",
        "DISPLAY": spec.display,
        "XDG_CONFIG_HOME": os.path.join(home, ".config"),
        "XDG_CACHE_HOME": os.path.join(home, ".cache"),
    }
    try:
        # Its own session and process group, so DELETE can end the whole browser at once.
        # Its output may contain URLs (with the state): it goes nowhere.
        process = subprocess.Popen(
            argv,
            env=env,
            cwd=home,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
            close_fds=True,
            **identity,
        )
    except OSError as exc:
        shutil.rmtree(profile_dir, True)
        raise HttpError(400, "spawn_failed", f"The browser could not be started: {exc.strerror}.") from None
    log("oauth_browser_process", pid=process.pid, user=entry.pw_name, display=spec.display,
        debug_port=debug_port, sandbox="--no-sandbox" not in argv)
    return process, debug_port, profile_dir


def _navigate(port, url):
    """Load ``url`` in the browser's first page through the DevTools protocol (``Page.navigate``
    over its websocket, standard library only); True once Chromium accepted it."""
    pages = [p for p in _devtools_pages(port) if p.get("type") == "page" and p.get("webSocketDebuggerUrl")]
    if not pages:
        return False
    target = urlsplit(str(pages[0]["webSocketDebuggerUrl"]))
    if target.hostname not in ("127.0.0.1", "localhost") or target.port != port:
        return False
    request = json.dumps({"id": 1, "method": "Page.navigate", "params": {"url": url}}).encode()
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            key = base64.b64encode(os.urandom(16)).decode("ascii")
            sock.sendall((f"GET {target.path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
                          f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n")
                         .encode("ascii"))
            head = b""
            while b"\r\n\r\n" not in head:
                chunk = sock.recv(4096)
                if not chunk or len(head) > 16384:
                    return False
                head += chunk
            if b" 101 " not in head.split(b"\r\n", 1)[0]:
                return False
            rest = head.split(b"\r\n\r\n", 1)[1]
            mask = os.urandom(4)
            size = len(request)
            if size < 126:
                header = bytes([0x81, 0x80 | size])
            elif size < 65536:
                header = bytes([0x81, 0x80 | 126]) + size.to_bytes(2, "big")
            else:
                header = bytes([0x81, 0x80 | 127]) + size.to_bytes(8, "big")
            sock.sendall(header + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(request)))
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:  # answers and events until the one with id 1
                rest, message = _ws_message(sock, rest)
                if message is None:
                    return False
                try:
                    doc = json.loads(message)
                except ValueError:
                    continue
                if isinstance(doc, dict) and doc.get("id") == 1:
                    return "error" not in doc
    except OSError:
        return False
    return False


def _ws_message(sock, buffered):
    """One unmasked server frame's payload from ``sock`` (``buffered`` first); (rest, None) on EOF."""
    def need(count):
        nonlocal buffered
        while len(buffered) < count:
            chunk = sock.recv(65536)
            if not chunk:
                return None
            buffered += chunk
        taken, buffered = buffered[:count], buffered[count:]
        return taken
    head = need(2)
    if head is None:
        return buffered, None
    size = head[1] & 0x7F
    if size == 126:
        ext = need(2)
        size = int.from_bytes(ext, "big") if ext else 0
    elif size == 127:
        ext = need(8)
        size = int.from_bytes(ext, "big") if ext else 0
    if size > 4 * 1024 * 1024:
        return buffered, None
    payload = need(size)
    if payload is None:
        return buffered, None
    return buffered, payload.decode("utf-8", "replace")


async def _serve_warm_page(reader, writer):
    """The warm browser's page (any other path: 404), one request per connection."""
    try:
        with contextlib.suppress(TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), CALLBACK_READ_TIMEOUT_S)
            parts = head.split(b"\r\n", 1)[0].split(b" ")
            if len(parts) == 3 and parts[0] == b"GET" and parts[1] == b"/":
                await _respond(writer, 200, WARM_TITLE, "The secure browser is ready.")
            else:
                await _respond(writer, 404, "Not found", "There is nothing here.")
    except (ConnectionError, OSError):
        pass
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()


class WarmBrowser:
    """Chromium started before any flow (warm pool), on the agent's loopback page; a flow takes it over."""

    def __init__(self, spec, url):
        self.key = spec.key
        parts = urlsplit(url)
        self.origin = f"{parts.scheme}://{parts.netloc}"
        self.process, self.debug_port, self.profile_dir = _spawn_browser(
            spec, f"--app={url}" if spec.app_window else url, "warm-")

    def alive(self):
        return self.process.poll() is None

    async def close(self):
        await asyncio.to_thread(_kill_group, self.process, self.profile_dir)
        await asyncio.to_thread(shutil.rmtree, self.profile_dir, True)


# -- the endpoints -----------------------------------------------------------------------------


class OAuthFlows:
    """``/v1/oauth/flows``, ``/v1/oauth/flows/{id}`` and ``/v1/oauth/browser`` (the warm browser)."""

    def __init__(self):
        self.flows = {}
        self.warm = None
        self._warming = asyncio.Lock()

    async def dispatch(self, request):
        path = request.path.rstrip("/")
        if path == BROWSER_PATH:
            if request.method == "POST":
                return await self.prewarm(request.json())
            if request.method == "DELETE":
                await self._drop_warm()
                return 200, {"ready": False}
            raise HttpError(405, "method_not_allowed", f"{request.method} is not allowed on {BROWSER_PATH}.")
        if path == FLOWS_PATH:
            if request.method != "POST":
                raise HttpError(405, "method_not_allowed", f"{request.method} is not allowed on {FLOWS_PATH}.")
            return await self.create(request.json())
        prefix = FLOWS_PATH + "/"
        flow_id = path[len(prefix) :] if path.startswith(prefix) else ""
        if not _FLOW_ID.match(flow_id):
            raise HttpError(404, "not_found", f"No endpoint {request.path}.")
        if request.method == "GET":
            flow = self.flows.get(flow_id)
            if flow is None:
                raise HttpError(404, "flow_not_found", "No such sign-in flow in this VM.")
            return 200, flow.describe()
        if request.method == "DELETE":
            flow = self.flows.pop(flow_id, None)
            if flow is not None:
                await flow.close()
                log("oauth_flow_deleted", flow=flow_id, status=flow.status)
            return 200, {"flow_id": flow_id, "deleted": flow is not None}
        raise HttpError(405, "method_not_allowed", f"{request.method} is not allowed on {request.path}.")

    async def prewarm(self, doc):
        """Start Chromium on a blank page for the next flow; answers once its page is up (201), or
        at once when such a browser already runs (200)."""
        if not isinstance(doc, dict):
            raise HttpError(400, "invalid_request", "The body must be a JSON object.")
        spec = BrowserSpec(doc.get("browser") or {})
        timeout_s = _number(doc, "timeout_s", DEFAULT_WARM_TIMEOUT_S, 1, 600)
        async with self._warming:
            if self.warm is not None and self.warm.alive() and self.warm.key == spec.key:
                return 200, {"ready": True, "pid": self.warm.process.pid}
            await self._drop_warm()
            started = time.monotonic()
            # The page is served only while the browser loads it; the server is gone after.
            server = await asyncio.start_server(_serve_warm_page, "127.0.0.1", 0, limit=CALLBACK_HEAD_LIMIT)
            try:
                port = server.sockets[0].getsockname()[1]
                warm = WarmBrowser(spec, f"http://127.0.0.1:{port}/")
                while time.monotonic() - started < timeout_s:
                    if not warm.alive():
                        await warm.close()
                        raise HttpError(400, "spawn_failed", "The browser exited while starting.")
                    pages = await asyncio.to_thread(_devtools_pages, warm.debug_port)
                    if any(p.get("type") == "page" and p.get("webSocketDebuggerUrl")
                           and p.get("title") == WARM_TITLE for p in pages):
                        self.warm = warm
                        log("oauth_browser_warm", pid=warm.process.pid, debug_port=warm.debug_port,
                            elapsed_s=round(time.monotonic() - started, 3))
                        return 201, {"ready": True, "pid": warm.process.pid}
                    await asyncio.sleep(POLL_INTERVAL_S)
                await warm.close()
                raise HttpError(504, "browser_timeout", "The browser did not show its page in time.")
            finally:
                server.close()

    async def _drop_warm(self):
        warm, self.warm = self.warm, None
        if warm is not None:
            await warm.close()

    def _take_warm(self, spec):
        """The warm browser for a flow run as ``spec`` says (it is the flow's from now on), or None."""
        warm = self.warm
        if warm is None or warm.key != spec.browser_key or not warm.alive():
            return None
        self.warm = None
        return warm

    async def create(self, doc):
        spec = FlowSpec(doc)
        if spec.flow_id in self.flows:
            raise HttpError(409, "flow_exists", "A sign-in flow with this id already exists.")
        flow = Flow(spec)
        self.flows[spec.flow_id] = flow
        try:
            await flow.start(self._take_warm(spec))
        except BaseException:
            self.flows.pop(spec.flow_id, None)
            raise
        log(
            "oauth_flow_started",
            flow=flow.flow_id,
            authorize_host=flow.authorize_host,
            redirect_uri=flow.redirect_uri,
            pkce=spec.pkce,
            scopes=len(spec.scopes),
        )
        return 201, {"flow_id": flow.flow_id, "redirect_uri": flow.redirect_uri, "status": flow.status}

    async def close_all(self):
        with contextlib.suppress(Exception):
            await self._drop_warm()
        flows = list(self.flows.values())
        self.flows.clear()
        for flow in flows:
            with contextlib.suppress(Exception):
                await flow.close()


__all__ = ["BROWSER_PATH", "FLOWS_PATH", "OAuthFlows"]
