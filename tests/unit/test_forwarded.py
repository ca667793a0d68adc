"""X-Forwarded-For from a peer that is not a trusted proxy: the controller warns in its log and
``doctor`` says so (services/forwarded.py), on a real uvicorn server as ``remotecli serve`` sets it up."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import uvicorn

from remotecli.app import create_app
from remotecli.config import Settings
from remotecli.context import AppContext
from remotecli.services import forwarded
from tests.support.server import free_port


@pytest.fixture(autouse=True)
def _fresh_rate_limit() -> Iterator[None]:
    forwarded._warned.clear()
    yield
    forwarded._warned.clear()


def _serve(ctx: AppContext, port: int) -> Iterator[str]:
    """Like cli/commands_server.py's _serve: proxy headers only from the configured proxies."""
    import threading
    import time

    settings = ctx.settings
    config = uvicorn.Config(create_app(ctx, background=False), host="127.0.0.1", port=port, log_config=None,
                            access_log=False, proxy_headers=bool(settings.trusted_proxies),
                            forwarded_allow_ips=settings.trusted_proxies or None)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)


def _ctx(tmp_path: Path, trusted: str) -> AppContext:
    settings = Settings(data_dir=tmp_path / "data", driver="fake", run_background=False,
                        trusted_proxies=trusted)
    return AppContext.create(settings)


def test_untrusted_forwarder_is_logged_once_and_shown_by_doctor(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ctx = _ctx(tmp_path, "")
    try:
        assert forwarded.doctor_check(ctx.settings)[1]  # nothing seen yet: fine
        caplog.set_level(logging.WARNING, logger="remotecli.proxy")
        for base in _serve(ctx, free_port()):
            for _ in range(3):
                response = httpx.get(f"{base}/healthz", headers={"X-Forwarded-For": "198.51.100.7"}, timeout=5)
                assert response.status_code == 200
            httpx.get(f"{base}/healthz", timeout=5)  # no header: nothing to say
        warnings = [r.getMessage() for r in caplog.records if r.name == "remotecli.proxy"]
        assert len(warnings) == 1, warnings  # once per peer per hour, not per request
        assert "127.0.0.1" in warnings[0] and "REMOTECLI_TRUSTED_PROXIES" in warnings[0]
        name, ok, detail = forwarded.doctor_check(ctx.settings)
        assert name == "reverse proxy" and not ok and "127.0.0.1" in detail, detail
        recorded = json.loads((ctx.settings.data_dir / forwarded.MARKER).read_text())
        assert list(recorded) == ["127.0.0.1"]
        # Once the operator trusts that proxy, doctor is satisfied.
        ctx.settings.trusted_proxies = "127.0.0.1"
        assert forwarded.doctor_check(ctx.settings)[1]
    finally:
        ctx.close()


def test_trusted_proxy_header_is_applied_and_not_warned(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    ctx = _ctx(tmp_path, "127.0.0.1")
    try:
        caplog.set_level(logging.WARNING, logger="remotecli.proxy")
        for base in _serve(ctx, free_port()):
            response = httpx.get(f"{base}/healthz", headers={"X-Forwarded-For": "198.51.100.7"}, timeout=5)
            assert response.status_code == 200
        assert not [r for r in caplog.records if r.name == "remotecli.proxy"]
        assert not (ctx.settings.data_dir / forwarded.MARKER).exists()
        _name, ok, detail = forwarded.doctor_check(ctx.settings)
        assert ok and detail == "X-Forwarded-For honoured from 127.0.0.1"
    finally:
        ctx.close()


def test_forwarded_ignored_and_trust_rules(tmp_path: Path) -> None:
    assert forwarded.forwarded_ignored("127.0.0.1", "203.0.113.9")
    assert not forwarded.forwarded_ignored("203.0.113.9", "203.0.113.9, 10.0.0.1")  # applied by uvicorn
    assert not forwarded.forwarded_ignored("127.0.0.1", "") and not forwarded.forwarded_ignored(None, "1.2.3.4")
    settings = Settings(data_dir=tmp_path, trusted_proxies="10.0.0.0/8, 127.0.0.1")
    assert forwarded.is_trusted(settings, "10.2.3.4") and forwarded.is_trusted(settings, "127.0.0.1")
    assert not forwarded.is_trusted(settings, "192.168.1.1")
    assert forwarded.is_trusted(Settings(data_dir=tmp_path, trusted_proxies="*"), "192.168.1.1")


def test_doctor_shows_the_reverse_proxy_check(tmp_path: Path, db_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from click.testing import CliRunner

    from remotecli.cli.main import main

    data = tmp_path / "data"
    monkeypatch.setenv("REMOTECLI_DATA_DIR", str(data))
    monkeypatch.setenv("REMOTECLI_DATABASE_URL", db_url)
    monkeypatch.setenv("REMOTECLI_DRIVER", "fake")

    def proxy_check() -> dict[str, object]:
        result = CliRunner().invoke(main, ["doctor", "--json"], catch_exceptions=False)
        return next(c for c in json.loads(result.output) if c["check"] == "reverse proxy")

    assert proxy_check()["ok"] is True
    forwarded.note_request(Settings(data_dir=data), "127.0.0.1", "203.0.113.5")
    check = proxy_check()
    assert check["ok"] is False and "127.0.0.1" in str(check["detail"])
    monkeypatch.setenv("REMOTECLI_TRUSTED_PROXIES", "127.0.0.1")
    assert proxy_check()["ok"] is True
