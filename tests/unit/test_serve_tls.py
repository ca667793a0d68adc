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
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2)  # plain HTTP is not served
    finally:
        server.terminate()
        server.wait(10)
