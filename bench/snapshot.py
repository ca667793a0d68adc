"""Snapshot restore benchmark (ADR 0012): a Browser VM restored from the snapshot vs booted cold.

    .venv/bin/python bench/snapshot.py [--runs 3] [--data-dir DIR] [--chromium] [--no-write]

Both sides are timed the same way, as a sign-in waits for them: ``driver.create()`` until the
guest agent answers ``health`` with the VM's own secret on its forwarded port. The restore side
uses the snapshot under ``<data dir>/snapshots/browser`` (built first when missing or stale; its
build time is reported); the cold side boots the same image with a driver whose data directory
has no snapshot. ``--chromium`` also times one headless Chromium start in each VM right after it
is ready (the restored VM has Chromium's files in its page cache from the template's warm-up).

``measure_restore(settings)`` is the same measurement as a function (``bench/auth.py`` and
``tests/integration/test_snapshot.py`` use it). Results go to ``docs/benchmarks.md`` under
"## Snapshot restore" (only that section is rewritten).
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import secrets
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from remotecli import images  # noqa: E402
from remotecli.config import Settings  # noqa: E402
from remotecli.drivers.base import VmSpec  # noqa: E402
from remotecli.drivers.qemu import snapshot  # noqa: E402
from remotecli.drivers.qemu.driver import QemuDriver  # noqa: E402

BENCH_DOC = REPO / "docs" / "benchmarks.md"
CHROMIUM = ["setpriv", "--reuid=browser", "--regid=browser", "--init-groups", "env", "HOME=/tmp",
            "chromium", "--headless", "--no-sandbox", "--disable-gpu", "--dump-dom", "about:blank"]


@dataclass
class RestoreFigures:
    cold_s: list[float] = field(default_factory=list)
    restore_s: list[float] = field(default_factory=list)
    cold_chromium_s: list[float] = field(default_factory=list)
    restore_chromium_s: list[float] = field(default_factory=list)
    build_s: float | None = None  # None: the snapshot was already there
    state_mib: float = 0.0
    accel: str = ""

    @property
    def cold(self) -> float:
        return statistics.median(self.cold_s)

    @property
    def restore(self) -> float:
        return statistics.median(self.restore_s)

    @property
    def ratio(self) -> float:
        return self.cold / self.restore

    def summary(self) -> str:
        text = (f"Browser VM to agent ready ({self.accel}): cold boot {self.cold:.2f} s, restore {self.restore:.2f} s "
                f"(median of {len(self.restore_s)}), restore {self.ratio:.1f}x faster; snapshot state "
                f"{self.state_mib:.0f} MiB")
        if self.cold_chromium_s and self.restore_chromium_s:
            text += (f"; first headless Chromium start: cold VM {statistics.median(self.cold_chromium_s):.2f} s, "
                     f"restored VM {statistics.median(self.restore_chromium_s):.2f} s")
        return text


def _spec(settings: Settings, name: str) -> VmSpec:
    vcpus, memory = settings.vm_defaults("browser")
    return VmSpec(vm_id=f"bench-{name}-{secrets.token_hex(3)}", vm_type="browser", vcpus=vcpus, memory_mib=memory,
                  directory=settings.vms_dir / f"{name}-{secrets.token_hex(3)}", agent_secret=secrets.token_urlsafe(32),
                  image=images.require(settings, "browser"))


def _one(driver: QemuDriver, spec: VmSpec, *, chromium: bool) -> tuple[float, bool, float | None]:
    """(seconds to agent ready, restored?, seconds for a headless Chromium start or None)."""
    started = time.monotonic()
    try:
        boot = driver.create(spec)
        client = driver.agent_client(boot.endpoint, spec.agent_secret, timeout=5.0)
        try:
            client.wait_ready(300.0, poll_interval=0.05)
            ready = time.monotonic() - started
            browser_s = None
            if chromium:
                began = time.monotonic()
                result = client.exec(CHROMIUM, timeout_s=180)
                browser_s = time.monotonic() - began if result.exit_code == 0 else None
        finally:
            client.close()
        return ready, boot.restored, browser_s
    finally:
        driver.destroy(spec)


def measure_restore(settings: Settings, *, driver: QemuDriver | None = None, runs: int = 1,
                    chromium: bool = False) -> RestoreFigures:
    """Build (or reuse) the Browser snapshot, then time ``runs`` restores and ``runs`` cold boots,
    one after the other (never two VMs at once). Raises if a restore fell back to a cold boot."""
    driver = driver or QemuDriver(settings)
    figures = RestoreFigures(accel=driver.accel())
    before = snapshot.read_manifest(snapshot.directory(settings, "browser")).get("created_at")
    started = time.monotonic()
    ref = driver.prepare_snapshot("browser")
    if ref is None:
        raise RuntimeError("this driver has no snapshot restore")
    manifest = snapshot.read_manifest(ref.directory)
    if manifest.get("created_at") != before:
        figures.build_s = time.monotonic() - started
    figures.state_mib = (ref.directory / snapshot.STATE_FILE).stat().st_size / 2**20
    # The cold side: the same settings and image, a data directory without a snapshot.
    cold_dir = Path(tempfile.mkdtemp(prefix="rc-cold-"))
    cold_driver = QemuDriver(settings.model_copy(update={"data_dir": cold_dir, "accel": figures.accel}))
    try:
        for _ in range(runs):
            took, restored, browser_s = _one(driver, _spec(settings, "restore"), chromium=chromium)
            if not restored:
                raise RuntimeError("the restore fell back to a cold boot (see the log)")
            figures.restore_s.append(took)
            if browser_s is not None:
                figures.restore_chromium_s.append(browser_s)
            took, restored, browser_s = _one(cold_driver, _spec(cold_driver.settings, "cold"), chromium=chromium)
            assert not restored
            figures.cold_s.append(took)
            if browser_s is not None:
                figures.cold_chromium_s.append(browser_s)
    finally:
        shutil.rmtree(cold_dir, ignore_errors=True)
    return figures


def write_section(text: str) -> None:
    doc = BENCH_DOC.read_text() if BENCH_DOC.exists() else "# Benchmarks\n"
    pattern = re.compile(r"^## Snapshot restore\n.*?(?=^## |\Z)", re.S | re.M)
    doc = pattern.sub(lambda _: text, doc) if pattern.search(doc) else doc.rstrip("\n") + "\n\n" + text
    BENCH_DOC.write_text(doc)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--data-dir", type=Path, default=None, help="default: a new temporary directory")
    parser.add_argument("--chromium", action="store_true", help="also time a headless Chromium start in each VM")
    parser.add_argument("--no-write", action="store_true", help=f"do not rewrite {BENCH_DOC.name}")
    args = parser.parse_args()
    data_dir = args.data_dir or Path(tempfile.mkdtemp(prefix="rc-bench-"))
    overrides: dict[str, object] = {"data_dir": data_dir, "driver": "qemu"}
    if os.environ.get("REMOTECLI_TEST_DATA_DIR"):
        overrides["shared_images_dir"] = Path(os.environ["REMOTECLI_TEST_DATA_DIR"]) / "images"
    settings = Settings(**overrides)  # type: ignore[arg-type]
    figures = measure_restore(settings, runs=args.runs, chromium=args.chromium)
    print(figures.summary())
    if args.no_write:
        return 0
    vcpus, memory = settings.vm_defaults("browser")
    pairs = enumerate(zip(figures.cold_s, figures.restore_s, strict=True))
    rows = "\n".join(f"| {i + 1} | {c:.2f} | {r:.2f} |" for i, (c, r) in pairs)
    chromium = ""
    if figures.cold_chromium_s and figures.restore_chromium_s:
        chromium = (f"\nFirst headless Chromium start inside the VM right after it was ready (`chromium --headless "
                    f"--dump-dom about:blank`): cold VM {statistics.median(figures.cold_chromium_s):.2f} s, "
                    f"restored VM {statistics.median(figures.restore_chromium_s):.2f} s (median): the template's "
                    "warm-up left Chromium's files in the page cache the snapshot keeps.\n")
    build = f"{figures.build_s:.0f} s" if figures.build_s is not None else "reused (built earlier)"
    section = f"""## Snapshot restore (bench/snapshot.py)

{datetime.now(UTC):%Y-%m-%d}, {platform.machine()}, {os.cpu_count()} cores, accel **{figures.accel}**, Browser VM
{vcpus} vCPUs / {memory} MiB. `driver.create()` until the agent answers `health` with the VM's own secret,
one VM at a time, {len(figures.cold_s)} runs each (ADR 0012, "Snapshot restore").

| run | cold boot (s) | restore (s) |
|---|---|---|
{rows}

Median: cold boot **{figures.cold:.2f} s**, restore **{figures.restore:.2f} s**: restore is
**{figures.ratio:.1f}x** faster. Snapshot: {figures.state_mib:.0f} MiB of saved state (guest RAM that is not
zero; the template runs with `init_on_free=1`), build {build} (template boot, Chromium warm-up, save).
{chromium}
"""
    write_section(section)
    print(f"wrote the Snapshot restore section of {BENCH_DOC}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
