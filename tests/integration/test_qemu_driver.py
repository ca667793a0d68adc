"""The QEMU driver against real microVMs booted from the built images (no database, no services).

Images are reused from ``REMOTECLI_TEST_DATA_DIR`` (default ``<repo>/.data/test-images``): builds
are cached by recipe hash. When they are missing the tests skip, unless ``REMOTECLI_BUILD_IMAGES``
is set, in which case the module builds them first (about a minute, needs root and the tools of
scripts/install-system-deps.sh).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import stat
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from remotecli import images
from remotecli.config import Settings
from remotecli.drivers.base import ImageRef, Liveness, PowerState, VmGone, VmSpec
from remotecli.drivers.qemu import QemuDriver
from remotecli.errors import VmBootFailed
from tests.support.net import process_gone, stops_listening

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
DATA_DIR = Path(os.environ.get("REMOTECLI_TEST_DATA_DIR") or REPO / ".data" / "test-images")
DRIVER_DATA_DIR = DATA_DIR.parent / "qemu-driver-test"
MARKER = "remotecli-init: agent starting"
BOOT_TIMEOUT = 120.0


@pytest.fixture(scope="module")
def settings() -> Settings:
    if shutil.which("qemu-system-x86_64") is None or shutil.which("qemu-img") is None:
        pytest.skip("QEMU is not installed (scripts/install-system-deps.sh installs it)")
    s = Settings(data_dir=DATA_DIR, driver="qemu")
    s.ensure_dirs()
    if images.resolve(s, "cli") is None:
        if not os.environ.get("REMOTECLI_BUILD_IMAGES"):
            pytest.skip(
                f"the cli guest image is not built in {DATA_DIR}; build it with "
                f"REMOTECLI_DATA_DIR={DATA_DIR} remotecli images build cli, "
                "or set REMOTECLI_BUILD_IMAGES=1 to let this test build it"
            )
        images.build(s, ["cli"])
    return s


@pytest.fixture(scope="module")
def image(settings: Settings) -> ImageRef:
    ref = images.resolve(settings, "cli")
    assert ref is not None
    return ref


@pytest.fixture(scope="module")
def driver(settings: Settings) -> QemuDriver:
    # The VMs live in a data directory of their own: other integration tests share the image data
    # directory, and their reconciler may treat VMs it has no database row for as orphans.
    own = Settings(data_dir=DRIVER_DATA_DIR, driver="qemu", accel=settings.accel)
    own.ensure_dirs()
    return QemuDriver(own)


@pytest.fixture
def make_spec(image: ImageRef, driver: QemuDriver) -> Iterator[object]:
    settings = driver.settings
    made: list[VmSpec] = []

    def make(**overrides: object) -> VmSpec:
        vm_id = f"vm-t{secrets.token_hex(4)}"
        values: dict[str, object] = {
            "vm_id": vm_id,
            "vm_type": "cli",
            "vcpus": 2,
            "memory_mib": 1024,
            "directory": settings.vms_dir / vm_id,
            "agent_secret": secrets.token_urlsafe(32),
            "image": image,
        }
        values.update(overrides)
        spec = VmSpec(**values)  # type: ignore[arg-type]
        made.append(spec)
        return spec

    yield make
    for spec in made:
        driver.destroy(spec)


def wait_console(spec: VmSpec, text: str, timeout: float = BOOT_TIMEOUT, after: int = 0) -> float:
    """Seconds until ``text`` appears in console.log (counting occurrences past ``after``)."""
    started = time.monotonic()
    path = spec.directory / "console.log"
    while time.monotonic() - started < timeout:
        try:
            content = path.read_text(errors="replace")
        except OSError:
            content = ""
        if content.count(text) > after:
            return time.monotonic() - started
        time.sleep(0.1)
    tail = path.read_text(errors="replace")[-3000:] if path.exists() else "(no console.log)"
    raise AssertionError(f"{text!r} not on the console within {timeout}s; console tail:\n{tail}")


def port_of(endpoint: str) -> int:
    return int(endpoint.rsplit(":", 1)[1])


def port_free(port: int) -> bool:
    """Nothing listens there any more (closed connections lingering in FIN_WAIT/TIME_WAIT are fine)."""
    return stops_listening(port)


def agent_health(endpoint: str, secret: str) -> None:
    """If the guest agent package exists, its /v1/health answers on the forwarded port."""
    if not (REPO / "src/remotecli/agent/guest/__main__.py").exists():
        return
    try:
        from remotecli.agent.client import AgentClient
    except ImportError:
        return
    with AgentClient(endpoint, secret, timeout=10) as client:
        health = client.wait_ready(BOOT_TIMEOUT)
    assert health.vm_type == "cli"


def test_lifecycle(driver: QemuDriver, make_spec) -> None:  # type: ignore[no-untyped-def]
    spec: VmSpec = make_spec()
    boot = driver.create(spec)
    assert boot.endpoint.startswith("tcp://127.0.0.1:")
    assert boot.accel in ("kvm", "tcg")
    assert boot.pid is not None
    # idempotent: a second create returns the running VM
    again = driver.create(spec)
    assert (again.endpoint, again.pid) == (boot.endpoint, boot.pid)

    wait_console(spec, MARKER)
    seen = driver.inspect(spec)
    assert seen.liveness is Liveness.ALIVE and seen.power is PowerState.RUNNING
    agent_health(boot.endpoint, spec.agent_secret)

    # files and secrets
    assert stat.S_IMODE(spec.directory.stat().st_mode) == 0o700
    assert stat.S_IMODE((spec.directory / "config.img").stat().st_mode) == 0o600
    config = (spec.directory / "config.img").read_bytes()
    assert len(config) == 64 * 1024
    document = json.loads(config.split(b"\0", 1)[0])
    assert document["agent_secret"] == spec.agent_secret and document["agent_port"] == 7000
    assert spec.agent_secret not in (spec.directory / "vm.json").read_text()
    assert spec.agent_secret.encode() not in Path(f"/proc/{boot.pid}/cmdline").read_bytes()
    assert spec.agent_secret not in repr(seen)

    driver.pause(spec)
    assert driver.inspect(spec).power is PowerState.PAUSED
    driver.pause(spec)  # idempotent
    driver.resume(spec)
    assert driver.inspect(spec).power is PowerState.RUNNING
    driver.resume(spec)  # idempotent

    started = time.monotonic()
    driver.stop(spec, timeout=30)
    stop_seconds = time.monotonic() - started
    assert process_gone(boot.pid)
    stopped = driver.inspect(spec)
    assert stopped.liveness is Liveness.DEAD and stopped.reason == "process exited"
    assert spec.directory.is_dir() and (spec.directory / "disk.qcow2").is_file()
    # the guest powered itself off on the ACPI power button (no kill needed)
    assert "remotecli-init: shutting down" in (spec.directory / "console.log").read_text(errors="replace")
    assert stop_seconds < 25
    driver.stop(spec, timeout=5)  # idempotent

    restarted = driver.start(spec)
    assert restarted.pid != boot.pid
    wait_console(spec, MARKER)
    assert driver.inspect(spec).power is PowerState.RUNNING
    agent_health(restarted.endpoint, spec.agent_secret)
    assert driver.start(spec).pid == restarted.pid  # idempotent

    driver.destroy(spec)
    assert process_gone(restarted.pid)
    assert not spec.directory.exists()
    assert port_free(port_of(restarted.endpoint))
    gone = driver.inspect(spec)
    assert gone.liveness is Liveness.DEAD and gone.reason == "directory missing"
    driver.destroy(spec)  # idempotent
    driver.stop(spec, timeout=1)  # nothing to do
    with pytest.raises(VmGone):
        driver.pause(spec)
    with pytest.raises(VmGone):
        driver.start(spec)
    assert spec.vm_id not in {vm.vm_id for vm in driver.list_host_vms(driver.settings.vms_dir)}


def test_killed_process_is_dead(driver: QemuDriver, make_spec) -> None:  # type: ignore[no-untyped-def]
    spec: VmSpec = make_spec()
    boot = driver.create(spec)
    assert boot.pid is not None
    assert driver.inspect(spec).alive
    os.kill(boot.pid, signal.SIGKILL)
    assert process_gone(boot.pid)
    seen = driver.inspect(spec)
    assert seen.liveness is Liveness.DEAD and seen.reason == "process exited"
    found = {vm.vm_id: vm for vm in driver.list_host_vms(driver.settings.vms_dir)}
    assert found[spec.vm_id].pid is None and found[spec.vm_id].directory == spec.directory
    driver.destroy(spec)
    assert not spec.directory.exists()


def test_removed_directory_is_dead_and_orphan_is_found(driver: QemuDriver, make_spec) -> None:  # type: ignore[no-untyped-def]
    spec: VmSpec = make_spec()
    boot = driver.create(spec)
    assert boot.pid is not None
    shutil.rmtree(spec.directory)
    seen = driver.inspect(spec)
    assert seen.liveness is Liveness.DEAD and seen.reason == "directory missing"
    found = {vm.vm_id: vm for vm in driver.list_host_vms(driver.settings.vms_dir)}
    assert found[spec.vm_id].directory is None and found[spec.vm_id].pid == boot.pid
    driver.destroy(spec)  # kills the orphaned process too
    assert process_gone(boot.pid)
    assert port_free(port_of(boot.endpoint))


def test_qemu_exit_during_startup_is_boot_failed(
    driver: QemuDriver,
    make_spec,
    image: ImageRef,
    tmp_path: Path,  # type: ignore[no-untyped-def]
) -> None:
    bogus_kernel = tmp_path / "vmlinuz"
    bogus_kernel.write_bytes(b"not a kernel" * 100)
    bad = ImageRef(
        vm_type="cli", kernel=bogus_kernel, initrd=image.initrd, rootfs=image.rootfs, recipe_hash=image.recipe_hash
    )
    spec: VmSpec = make_spec(image=bad)
    with pytest.raises(VmBootFailed) as caught:
        driver.create(spec)
    assert caught.value.log_detail
    assert spec.agent_secret not in str(caught.value) and spec.agent_secret not in (caught.value.log_detail or "")
    assert driver.inspect(spec).liveness is Liveness.DEAD
