"""Boot benchmark for the QEMU driver: create request -> guest agent ready, and memory overhead.

    .venv/bin/python bench/boot.py [--runs 6] [--data-dir DIR] [--memory-mib 1024] [--no-write]

Runs alternate between guest confinement on (QEMU as a uid of its own, nftables rules installed
before the launch; drivers/qemu/confinement.py) and off, so the cost of confinement is measured
side by side in one run; the time of one ``confine()`` call (uid range check + one nft
transaction) is timed on its own too. As root only; otherwise every run is unconfined.

Each run creates a fresh ``cli`` VM (new directory, new qcow2 overlay: a cold boot of the guest),
times ``driver.create()`` until ``AgentClient.health()`` answers on the forwarded port, then
measures the host memory the VM costs and destroys it.

Memory overhead method: QEMU maps guest RAM as one anonymous mapping of exactly ``-m`` bytes. In
``/proc/<qemu pid>/smaps`` that mapping's ``Rss`` is the guest RAM actually touched (host pages
backing guest pages); every other mapping's ``Rss`` is QEMU's own cost (device emulation, slirp,
the TCG translation cache under TCG, libraries). Overhead = total ``Rss`` - guest-RAM ``Rss``.
Measured right after the agent answered, so the guest has booted and started Python.

Results go to ``docs/benchmarks.md`` under "## Boot" (only that section is rewritten).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import secrets
import statistics
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from remotecli import images  # noqa: E402
from remotecli.agent.client import AgentClient  # noqa: E402
from remotecli.config import Settings  # noqa: E402
from remotecli.drivers.base import VmSpec  # noqa: E402
from remotecli.drivers.qemu import QemuDriver  # noqa: E402
from remotecli.errors import VmBootFailed  # noqa: E402

BENCH_DOC = REPO / "docs" / "benchmarks.md"


def smaps_rss(pid: int, guest_bytes: int) -> tuple[int, int]:
    """(total Rss, Rss of the guest-RAM mapping) in bytes, from /proc/<pid>/smaps."""
    total = guest = 0
    size = 0
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        header = re.match(r"^([0-9a-f]+)-([0-9a-f]+) ", line)
        if header:
            size = int(header.group(2), 16) - int(header.group(1), 16)
            continue
        if line.startswith("Rss:"):
            rss = int(line.split()[1]) * 1024
            total += rss
            if size == guest_bytes:
                guest += rss
    return total, guest


def run_once(driver: QemuDriver, settings: Settings, memory_mib: int, timeout: float) -> dict[str, float]:
    image = images.resolve(settings, "cli")
    assert image is not None
    vm_id = f"vm-bench{secrets.token_hex(3)}"
    vms_dir = driver.settings.vms_dir
    spec = VmSpec(
        vm_id=vm_id,
        vm_type="cli",
        vcpus=2,
        memory_mib=memory_mib,
        directory=vms_dir / vm_id,
        agent_secret=secrets.token_urlsafe(32),
        image=image,
    )
    try:
        started = time.monotonic()
        boot = driver.create(spec)
        qemu_up = time.monotonic() - started
        with AgentClient(boot.endpoint, spec.agent_secret, timeout=10) as client:
            client.wait_ready(timeout, poll_interval=0.05)
        ready = time.monotonic() - started
        assert boot.pid is not None
        total, guest = smaps_rss(boot.pid, memory_mib * 1024 * 1024)
        record = json.loads((spec.directory / "vm.json").read_text())
        return {
            "boot_attempts": float(record.get("boot_attempts", 1)),
            "qemu_up_s": qemu_up,
            "agent_ready_s": ready,
            "rss_mib": total / 2**20,
            "guest_touched_mib": guest / 2**20,
            "overhead_mib": (total - guest) / 2**20,
            "accel": 1.0 if boot.accel == "kvm" else 0.0,
        }
    finally:
        driver.destroy(spec)


def write_section(text: str) -> None:
    BENCH_DOC.parent.mkdir(parents=True, exist_ok=True)
    doc = BENCH_DOC.read_text() if BENCH_DOC.exists() else "# Benchmarks\n"
    pattern = re.compile(r"^## Boot\n.*?(?=^## |\Z)", re.S | re.M)
    found = pattern.search(doc) is not None
    doc = pattern.sub(lambda _m: text, doc) if found else doc.rstrip("\n") + "\n\n" + text
    BENCH_DOC.write_text(doc)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=6)
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=Path(os.environ.get("REMOTECLI_TEST_DATA_DIR") or REPO / ".data" / "test-images"),
    )
    parser.add_argument("--memory-mib", type=int, default=1024)
    parser.add_argument("--timeout", type=float, default=180.0)
    parser.add_argument("--no-write", action="store_true", help="do not update docs/benchmarks.md")
    args = parser.parse_args()

    settings = Settings(data_dir=args.data_dir, driver="qemu")
    settings.ensure_dirs()
    if images.resolve(settings, "cli") is None:
        print(f"cli image not built in {args.data_dir}; run: remotecli images build cli", file=sys.stderr)
        return 2
    # VMs in a data directory of their own (images come from --data-dir): integration tests that
    # share the image directory may reconcile away VMs they have no database row for.
    drivers = {}
    for mode in ("on", "off"):
        own = Settings(data_dir=args.data_dir.parent / "bench-boot", driver="qemu", guest_network_isolation=mode)
        own.ensure_dirs()
        drivers[mode] = QemuDriver(own)
    availability = drivers["on"].availability()
    accel = availability.facts.get("accel", "?")
    print(f"QEMU driver: {availability.detail}")
    confinable = os.geteuid() == 0
    confine_ms: list[float] = []
    if confinable:
        from remotecli.drivers.qemu import confinement

        for _ in range(20):
            started = time.perf_counter()
            confinement.confine(drivers["on"].settings)
            confine_ms.append((time.perf_counter() - started) * 1000)
    runs = []
    failures: list[str] = []
    for index in range(args.runs):
        mode = "on" if confinable and index % 2 == 0 else "off"
        try:
            result = run_once(drivers[mode], settings, args.memory_mib, args.timeout)
        except VmBootFailed as exc:  # reported, not hidden: a failed boot is a finding of the run
            print(f"run {index + 1}/{args.runs} (confinement {mode}): FAILED {exc.message}\n{exc.log_detail}",
                  flush=True)
            failures.append(f"run {index + 1} (confinement {mode}): {exc.message}")
            continue
        result["confined"] = 1.0 if mode == "on" else 0.0
        runs.append(result)
        print(
            f"run {index + 1}/{args.runs} (confinement {mode}): qemu up {result['qemu_up_s']:.2f}s, agent ready "
            f"{result['agent_ready_s']:.2f}s, RSS {result['rss_mib']:.0f} MiB (guest RAM touched "
            f"{result['guest_touched_mib']:.0f} MiB, overhead {result['overhead_mib']:.0f} MiB), "
            f"boot attempts {result['boot_attempts']:.0f}",
            flush=True,
        )
    ready = [r["agent_ready_s"] for r in runs]
    overhead = [r["overhead_mib"] for r in runs]
    touched = [r["guest_touched_mib"] for r in runs]
    summary = (
        f"median create -> agent ready: {statistics.median(ready):.2f}s "
        f"(min {min(ready):.2f}s, max {max(ready):.2f}s, n={len(ready)}, accel {accel}); "
        f"median QEMU overhead per VM: {statistics.median(overhead):.0f} MiB "
        f"(+ {statistics.median(touched):.0f} MiB guest RAM touched of {args.memory_mib} MiB)"
    )
    by_mode = {mode: [r["agent_ready_s"] for r in runs if r["confined"] == (1.0 if mode == "on" else 0.0)]
               for mode in ("on", "off")}
    if by_mode["on"] and by_mode["off"]:
        on, off = statistics.median(by_mode["on"]), statistics.median(by_mode["off"])
        summary += (
            f"; confinement on {on:.2f}s vs off {off:.2f}s (ratio {on / off:.2f}, n={len(by_mode['on'])}"
            f"+{len(by_mode['off'])}); one confine() call: median {statistics.median(confine_ms):.1f} ms"
        )
    print(summary)
    if not args.no_write:
        now = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
        rows = "\n".join(
            f"| {i + 1} | {'on' if r['confined'] else 'off'} | {r['qemu_up_s']:.2f} | {r['agent_ready_s']:.2f} | "
            f"{r['rss_mib']:.0f} | "
            f"{r['guest_touched_mib']:.0f} | {r['overhead_mib']:.0f} | {r['boot_attempts']:.0f} |"
            for i, r in enumerate(runs)
        )
        failed = ("\nFailed boots in this run: " + "; ".join(failures) + ".\n") if failures else ""
        section = f"""## Boot

Measured by `bench/boot.py` on {now}: {platform.node()}, {os.cpu_count()} cores, accel **{accel}**
({availability.detail}); `cli` VM, 2 vCPUs, {args.memory_mib} MiB, each run a fresh VM (new qcow2
overlay). "Agent ready" is from the `driver.create()` call until the guest agent answers
`GET /v1/health` on the forwarded loopback port. Memory: QEMU's total RSS minus the RSS of its
guest-RAM mapping (read from `/proc/<pid>/smaps`, see the script's docstring), right after the
agent answered; under TCG QEMU's own share includes the translated-code cache. "boots" > 1 means
the driver's TCG early-boot watchdog restarted a kernel that stalled (docs/decisions/0003).
Confinement "on": QEMU drops to a uid of its own and the host firewall rules are (re)installed before
the launch (docs/decisions/0007); runs alternate on/off so both share the same host conditions.

**{summary}**

| run | confined | QEMU up (s) | agent ready (s) | QEMU RSS (MiB) | guest RAM touched (MiB) | overhead (MiB) | boots |
| --- | --- | --- | --- | --- | --- | --- | --- |
{rows}
{failed}
"""
        write_section(section)
        print(f"wrote the Boot section of {BENCH_DOC}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
