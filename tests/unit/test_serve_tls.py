"""`remotecli serve --tls-cert/--tls-key` serves HTTPS (a real server process on 127.0.0.1)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.support.server import free_port


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl is not installed")
def test_serve_over_tls(tmp_path: Path) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj",
                    "/CN=127.0.0.1", "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    port = free_port()
    env = {**os.environ, "REMOTECLI_DATA_DIR": str(tmp_path / "data"), "REMOTECLI_DRIVER": "fake",
           "REMOTECLI_RUN_BACKGROUND": "false", "REMOTECLI_LOG_TO_STDERR": "false"}
    env.pop("REMOTECLI_DATABASE_URL", None)
    server = subprocess.Popen([sys.executable, "-m", "remotecli.cli", "serve", "--port", str(port),
                               "--tls-cert", str(cert), "--tls-key", str(key)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                response = httpx.get(f"https://127.0.0.1:{port}/healthz", verify=False, timeout=2)
                break
            except httpx.HTTPError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise
                time.sleep(0.2)
        assert response.status_code == 200 and response.json()["status"] == "ok"
        # Serving TLS itself, the controller tells browsers to use nothing else (HSTS), on every page.
        assert response.headers["strict-transport-security"] == "max-age=31536000"
        login = httpx.get(f"https://127.0.0.1:{port}/login", verify=False, timeout=5)
        assert login.headers["strict-transport-security"] == "max-age=31536000"
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2)  # plain HTTP is not served
    finally:
        server.terminate()
        server.wait(10)


def test_no_hsts_over_plain_http(tmp_path: Path) -> None:
    """Plain HTTP (behind a TLS proxy, which sets its own) carries no HSTS header."""
    from fastapi.testclient import TestClient

    from remotecli.app import create_app
    from remotecli.config import Settings
    from remotecli.context import AppContext

    settings = Settings(data_dir=tmp_path / "data", driver="fake", run_background=False)
    ctx = AppContext.create(settings)
    try:
        with TestClient(create_app(ctx, background=False)) as client:
            assert "strict-transport-security" not in client.get("/healthz").headers
    finally:
        ctx.close()
