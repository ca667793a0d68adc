"""The warm browser's own page (ADR 0012, "Warm means warmed up"), with the host's real Chromium.

The warm Chromium loads a page the agent serves on loopback before any flow; ``POST
/v1/oauth/browser`` answers once that page is loaded, the server is gone after it, and a flow that
takes the browser over never mistakes that page for the provider's sign-in page.
"""

from __future__ import annotations

import asyncio
import shutil
import socket
from urllib.parse import urlsplit

import pytest

from remotecli.agent.guest import oauth

pytestmark = pytest.mark.skipif(shutil.which("chromium") is None, reason="no chromium on this host")

BROWSER = {"user": None, "app": False, "extra_args": ["--headless=new"]}


def test_the_warm_page_is_loaded_first_and_never_taken_for_the_sign_in_page() -> None:
    async def scenario() -> None:
        flows = oauth.OAuthFlows()
        try:
            status, _ = await flows.prewarm({"browser": BROWSER, "timeout_s": 60})
            assert status == 201 and flows.warm is not None
            warm = flows.warm
            pages = [p for p in oauth._devtools_pages(warm.debug_port) if p.get("type") == "page"]
            assert pages and pages[0].get("title") == oauth.WARM_TITLE  # loaded, not merely listed
            origin = urlsplit(str(pages[0]["url"]))
            assert f"{origin.scheme}://{origin.netloc}" == warm.origin and origin.hostname == "127.0.0.1"
            with pytest.raises(OSError), socket.create_connection(("127.0.0.1", origin.port), timeout=2):
                pass  # the page's server closed once the page was loaded
            silent = socket.create_server(("127.0.0.1", 0))  # accepts, never answers: the page keeps loading
            await flows.create({
                "flow_id": "f1", "authorize_url": f"http://127.0.0.1:{silent.getsockname()[1]}/authorize",
                "token_url": "http://127.0.0.1:9/token", "client_id": "client",
                "redirect": {"host": "127.0.0.1", "port": 0, "path": "/cb"}, "browser": BROWSER})
            flow = flows.flows["f1"]
            flow._observe(pages)  # the warm page as the page list showed it before the takeover
            assert flow.status == oauth.PAGE_LOADING and flow.page_url is None
            for _ in range(20):  # the provider never answers: its page never shows
                await asyncio.sleep(0.1)
                assert flow.status == oauth.PAGE_LOADING, (flow.page_url, flow.page_title)
            silent.close()
        finally:
            await flows.close_all()

    asyncio.run(scenario())
