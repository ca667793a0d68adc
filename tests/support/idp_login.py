"""A real sign-in at the test IdP without a Browser VM: the test plays the Browser VM's Chromium
(an httpx client posting the IdP's own login and consent forms, as tests/e2e/test_sso.py does) and
its OAuth agent (the authorization request with ``state`` and PKCE S256 built from the controller's
``OAuthFlowSpec``, the loopback callback read from the IdP's redirect instead of a listener, and
the code exchanged at the IdP's token endpoint in the profile's style, as
``agent/guest/oauth.py`` does). What comes back is the IdP's real token response, which the
controller then captures and delivers through its own path (``services.credentials``).

Used where a Browser VM (a second QEMU guest with Chromium, minutes under TCG) would cost more
than the test is about; the full browser path is tests/e2e/test_auth_real_vms.py.
"""

from __future__ import annotations

import base64
import hashlib
import re
import secrets
import time
from urllib.parse import parse_qs, urlencode, urljoin, urlsplit

import httpx
from pydantic import JsonValue

from remotecli.agent.protocol import OAuthFlowSpec
from tests.support.idp_server import Idp

#: The loopback port the test's "OAuth agent" says it listens on (nothing needs to: the redirect to
#: it is read, not followed).
CALLBACK_PORT = 48123


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _form_action(page: httpx.Response) -> str:
    match = re.search(r'<form method="post" action="([^"]+)"', page.text)
    assert match, f"no form on {page.url}: {page.text[:300]}"
    return match.group(1)


def _until_callback(browser: httpx.Client, response: httpx.Response, redirect_uri: str) -> httpx.Response | str:
    """Follow the IdP's redirects; the callback URL once a redirect leads there, else the page."""
    for _ in range(10):
        if not response.is_redirect:
            return response
        target = urljoin(str(response.url), response.headers["location"])
        if target.startswith(redirect_uri):
            return target
        response = browser.get(target)
    raise AssertionError(f"too many redirects at {response.url}")


def sign_in_at_idp(idp: Idp, spec: OAuthFlowSpec, username: str, password: str) -> dict[str, JsonValue]:
    """Sign ``username`` in at ``idp`` for the flow ``spec`` describes (consent: allow); returns the
    token response, with ``obtained_at`` as the guest's OAuth agent adds it."""
    state = _b64url(secrets.token_bytes(32))
    verifier = _b64url(secrets.token_bytes(48))
    port = spec.redirect.port or CALLBACK_PORT
    redirect_uri = f"http://{spec.redirect.host}:{port}{spec.redirect.path}"
    params = {
        "response_type": "code", "client_id": spec.client_id, "redirect_uri": redirect_uri, "state": state,
        "code_challenge": _b64url(hashlib.sha256(verifier.encode("ascii")).digest()),
        "code_challenge_method": "S256",
    }
    if spec.scopes:
        params["scope"] = " ".join(spec.scopes)
    for key, value in spec.extra_authorize_params.items():
        params.setdefault(key, value)
    with httpx.Client(follow_redirects=False, timeout=30) as browser:
        login = _until_callback(browser, browser.get(f"{spec.authorize_url}?{urlencode(params)}"), redirect_uri)
        assert isinstance(login, httpx.Response) and "Sign in" in login.text, getattr(login, "text", login)[:300]
        consent = _until_callback(browser, browser.post(urljoin(str(login.url), _form_action(login)),
                                                        data={"username": username, "password": password}),
                                  redirect_uri)
        assert isinstance(consent, httpx.Response) and "Authorize" in consent.text, str(consent)[:300]
        callback = _until_callback(browser, browser.post(urljoin(str(consent.url), _form_action(consent)),
                                                         data={"decision": "allow"}), redirect_uri)
        assert isinstance(callback, str), f"the IdP did not redirect to {redirect_uri}"
        query = parse_qs(urlsplit(callback).query)
        assert query.get("state") == [state], "the callback's state is not the request's"
        code = query["code"][0]
        fields = {"grant_type": "authorization_code", "code": code, "redirect_uri": redirect_uri,
                  "client_id": spec.client_id, "code_verifier": verifier}
        if spec.client_secret:
            fields["client_secret"] = spec.client_secret
        if spec.token_request_style == "json":
            answer = browser.post(spec.token_url, json={**fields, "state": state})
        else:
            answer = browser.post(spec.token_url, data=fields)
    assert answer.status_code == 200, f"token exchange: HTTP {answer.status_code}"
    tokens = answer.json()
    assert isinstance(tokens, dict) and isinstance(tokens.get("access_token"), str)
    tokens["obtained_at"] = round(time.time(), 3)
    return tokens
