"""The guest OAuth agent's warm browser (warm pool, ADR 0012) with the host's real Chromium, headless.

``POST /v1/oauth/browser`` starts Chromium on a blank page; the next flow with the same browser
settings takes that very process over and loads its authorize URL through DevTools, instead of
starting a browser of its own; a flow with other settings starts its own as before.
"""

from __future__ import annotations

import asyncio
import shutil
import time

import pytest

from remotecli.agent.guest import oauth

pytestmark = pytest.mark.skipif(shutil.which("chromium") is None, reason="no chromium on this host")

BROWSER = {"user": None, "app": False, "extra_args": ["--headless=new"]}


def _flow(flow_id: str, browser: dict[str, object]) -> dict[str, object]:
    return {"flow_id": flow_id, "authorize_url": "http://127.0.0.1:9/authorize", "token_url": "http://127.0.0.1:9/token",
            "client_id": "client", "redirect": {"host": "127.0.0.1", "port": 0, "path": "/cb"}, "browser": browser}


def test_a_flow_takes_the_warm_browser_over() -> None:
    async def scenario() -> None:
        flows = oauth.OAuthFlows()
        try:
            status, body = await flows.prewarm({"browser": BROWSER, "timeout_s": 60})
            assert status == 201 and body["ready"]
            warm_pid = body["pid"]
            assert (await flows.prewarm({"browser": BROWSER}))[0] == 200  # already warm: same browser
            started = time.monotonic()
            status, _ = await flows.create(_flow("f1", BROWSER))
            assert status == 201 and flows.warm is None
            flow = flows.flows["f1"]
            assert flow._process is not None and flow._process.pid == warm_pid  # no new Chromium
            for _ in range(100):
                pages = oauth._devtools_pages(flow._debug_port)
                if pages and str(pages[0].get("url", "")).startswith("http://127.0.0.1:9/authorize?"):
                    break
                await asyncio.sleep(0.1)
            else:
                raise AssertionError(f"the warm page was not pointed at the authorize URL: {pages}")
            assert time.monotonic() - started < 10
            # Other browser settings: a browser of its own, the warm one untouched.
            await flows.prewarm({"browser": BROWSER})
            other = {**BROWSER, "extra_args": ["--headless=new", "--mute-audio"]}
            await flows.create(_flow("f2", other))
            assert flows.warm is not None and flows.flows["f2"]._process.pid != flows.warm.process.pid
        finally:
            await flows.close_all()

    asyncio.run(scenario())
