#!/usr/bin/env python3
"""API throughput and latency, with a bare FastAPI endpoint measured in the same run as the ceiling.

Starts each server (uvicorn, one worker, on 127.0.0.1) in its own process and loads it with
``wrk`` (Debian package ``wrk``) from this machine:

* ``bare``: a FastAPI app with one GET route returning a small JSON object (the ceiling);
* ``GET /api/v1/vms/{id}``: bearer-token auth, one database read, response model;
* ``POST /api/v1/vms/ensure``: for an existing VM: auth, selection, liveness proof (driver inspect
  + guest-agent health), last_seen update.

The controller runs with the ``fake`` driver by default, so the figures are the control plane's own
cost; ``--driver qemu`` measures ensure against a real VM (its agent health call included).

Usage: bench/api.py [--seconds 10] [--connections 16] [--db sqlite|postgresql://...] [--driver fake|qemu]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable

BARE_APP = '''
from fastapi import FastAPI
app = FastAPI()

@app.get("/bare/{item_id}")
def bare(item_id: str) -> dict[str, object]:
    return {"id": item_id, "status": "running", "vm_type": "cli", "vcpus": 2, "memory_mib": 2048}
'''


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_http(url: str, timeout: float = 60) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            if httpx.get(url, timeout=1).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{url} did not come up")


def run_wrk(url: str, seconds: int, connections: int, headers: dict[str, str], method: str = "GET",
            body: str | None = None) -> dict[str, float]:
    script: str | None = None
    args = ["wrk", "-t2", f"-c{connections}", f"-d{seconds}s", "--latency", "--timeout", "10s"]
    for key, value in headers.items():
        args += ["-H", f"{key}: {value}"]
    if method != "GET":
        with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as handle:
            handle.write(f'wrk.method = "{method}"\nwrk.body = {json.dumps(body or "")}\n'
                         'wrk.headers["Content-Type"] = "application/json"\n')
            script = handle.name
        args += ["-s", script]
    args.append(url)
    output = subprocess.run(args, capture_output=True, text=True, check=True).stdout
    if script:
        os.unlink(script)
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", output).group(1))  # type: ignore[union-attr]

    def pct(label: str) -> float:
        match = re.search(rf"^\s+{label}%\s+([\d.]+)(us|ms|s)", output, re.M)
        assert match, output
        value, unit = float(match.group(1)), match.group(2)
        return value / 1000 if unit == "us" else value * 1000 if unit == "s" else value

    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    if non2xx:
        raise RuntimeError(f"{url}: {non2xx.group(1)} error responses\n{output}")
    return {"rps": rps, "p50_ms": pct("50"), "p99_ms": pct("99")}


def start(cmd: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(cmd, env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT, start_new_session=True)


def stop(proc: subprocess.Popen[bytes]) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(10)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        os.killpg(proc.pid, signal.SIGKILL)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--db", default="sqlite", help="'sqlite' or a PostgreSQL URL")
    parser.add_argument("--driver", default="fake", choices=["fake", "qemu"])
    parser.add_argument("--data-dir", default=None, help="data dir (default: a temporary one; qemu needs images)")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args()
    if not shutil.which("wrk"):
        print("bench/api.py needs wrk: apt-get install wrk", file=sys.stderr)
        return 2

    work = Path(tempfile.mkdtemp(prefix="rcli-bench-"))
    data_dir = Path(args.data_dir) if args.data_dir else work / "data"
    env = {**os.environ, "REMOTECLI_DATA_DIR": str(data_dir), "REMOTECLI_DRIVER": args.driver,
           "REMOTECLI_LOG_LEVEL": "WARNING", "REMOTECLI_LOG_TO_STDERR": "false"}
    if args.db != "sqlite":
        env["REMOTECLI_DATABASE_URL"] = args.db
    cli = [PYTHON, "-m", "remotecli.cli"]
    user = f"bench{int(time.time())}"
    subprocess.run([*cli, "users", "create", user], env=env, check=True, capture_output=True)
    token = subprocess.run([*cli, "tokens", "create", user], env=env, check=True, capture_output=True,
                           text=True).stdout.strip()
    headers = {"Authorization": f"Bearer {token}"}

    results: dict[str, dict[str, float]] = {}
    procs: list[subprocess.Popen[bytes]] = []
    try:
        # The ceiling: a bare FastAPI endpoint under the same server settings.
        (work / "bare_app.py").write_text(BARE_APP)
        bare_port = free_port()
        procs.append(start([PYTHON, "-m", "uvicorn", "bare_app:app", "--host", "127.0.0.1", "--port",
                            str(bare_port), "--log-level", "warning", "--no-access-log"],
                           {**env, "PYTHONPATH": str(work)}, work / "bare.log"))
        port = free_port()
        procs.append(start([*cli, "serve", "--host", "127.0.0.1", "--port", str(port)], env, work / "server.log"))
        base = f"http://127.0.0.1:{port}"
        wait_http(f"http://127.0.0.1:{bare_port}/bare/x")
        wait_http(f"{base}/healthz")
        created = httpx.post(f"{base}/api/v1/vms/ensure", json={"vm_type": "cli"}, headers=headers, timeout=300)
        created.raise_for_status()
        vm_id = created.json()["id"]
        # Warm-up, then the three measurements back to back.
        run_wrk(f"http://127.0.0.1:{bare_port}/bare/{vm_id}", 2, args.connections, {})
        results["bare FastAPI GET (ceiling)"] = run_wrk(
            f"http://127.0.0.1:{bare_port}/bare/{vm_id}", args.seconds, args.connections, {})
        run_wrk(f"{base}/api/v1/vms/{vm_id}", 2, args.connections, headers)
        results["GET /api/v1/vms/{id}"] = run_wrk(f"{base}/api/v1/vms/{vm_id}", args.seconds, args.connections,
                                                  headers)
        results["POST /api/v1/vms/ensure (existing)"] = run_wrk(
            f"{base}/api/v1/vms/ensure", args.seconds, args.connections, headers, "POST", '{"vm_type": "cli"}')
        httpx.delete(f"{base}/api/v1/vms/{vm_id}", headers=headers, timeout=60)
    finally:
        for proc in procs:
            stop(proc)
        shutil.rmtree(work, ignore_errors=True)

    ceiling = results["bare FastAPI GET (ceiling)"]["rps"]
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    db_kind = "sqlite" if args.db == "sqlite" else "postgresql"
    print(f"# bench/api.py  {dt.date.today()}  db={db_kind} driver={args.driver} "
          f"wrk -t2 -c{args.connections} -d{args.seconds}s  cores={os.cpu_count()}")
    print(f"{'endpoint':38} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'of ceiling':>10}")
    for name, figures in results.items():
        print(f"{name:38} {figures['rps']:9.0f} {figures['p50_ms']:8.2f} {figures['p99_ms']:8.2f} "
              f"{figures['rps'] / ceiling:10.0%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
