"""Snapshot restore of Browser VMs with real QEMU (ADR 0012, "Snapshot restore").

One snapshot is built for the module (a template Browser VM booted, warmed and saved), then:
it is reused; restored VMs answer with their own secret and refuse each other's; their
/dev/urandom differs right after the restore; a restore is faster than a cold boot; a corrupted
and a mismatched snapshot fall back to a cold boot with a warning (driver log + the VM's event).
"""

from __future__ import annotations

import json
import logging
import secrets
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from sqlalchemy import select

from remotecli import images
from remotecli.background.pool import PoolKeeper
from remotecli.context import AppContext
from remotecli.db.models import Event
from remotecli.drivers.base import BootInfo, SnapshotRef, VmSpec
from remotecli.drivers.qemu import snapshot
from remotecli.drivers.qemu.driver import QemuDriver
from remotecli.errors import AgentRejected
from remotecli.services import users as users_service
from remotecli.services import vm_manager
from remotecli.services.users import Principal
from tests.integration.conftest import close_and_clean, qemu_settings, require_images

pytestmark = [pytest.mark.slow, pytest.mark.integration]


@dataclass
class Env:
    ctx: AppContext
    driver: QemuDriver
    ref: SnapshotRef
    build_s: float
    specs: list[VmSpec]

    def spec(self, name: str) -> VmSpec:
        settings = self.ctx.settings
        vcpus, memory = settings.vm_defaults("browser")
        spec = VmSpec(vm_id=f"vm-{name}-{secrets.token_hex(3)}", vm_type="browser", vcpus=vcpus, memory_mib=memory,
                      directory=settings.vms_dir / name, agent_secret=secrets.token_urlsafe(32),
                      image=images.require(settings, "browser"))
        self.specs.append(spec)
        return spec

    def create(self, spec: VmSpec) -> tuple[BootInfo, float]:
        """create + the agent answering with the VM's own secret: what a sign-in waits for."""
        started = time.monotonic()
        boot = self.driver.create(spec)
        client = self.driver.agent_client(boot.endpoint, spec.agent_secret, timeout=5.0)
        try:
            health = client.wait_ready(180.0)
        finally:
            client.close()
        assert health.vm_id == spec.vm_id
        return boot, time.monotonic() - started


@pytest.fixture(scope="module")
def env() -> Iterator[Env]:
    data_dir = Path(tempfile.mkdtemp(prefix="rc-"))
    settings = qemu_settings(f"sqlite:///{data_dir}/db.sqlite", data_dir=data_dir, browser_snapshot=True)
    require_images(settings, "browser")
    ctx = AppContext.create(settings)
    driver = ctx.driver
    assert isinstance(driver, QemuDriver)
    specs: list[VmSpec] = []
    try:
        started = time.monotonic()
        # The product's path: the pool's loop (pool size 0 here) builds the snapshot in the background.
        assert PoolKeeper(ctx).run_once() == 0
        ref = driver.prepare_snapshot("browser")  # fits now: returns at once
        assert ref is not None
        yield Env(ctx, driver, ref, time.monotonic() - started, specs)
    finally:
        for spec in specs:
            driver.destroy(spec)
        close_and_clean(ctx)


def _urandom(env: Env, spec: VmSpec, boot: BootInfo) -> bytes:
    client = env.driver.agent_client(boot.endpoint, spec.agent_secret, timeout=30.0)
    try:
        result = client.exec(["head", "-c", "32", "/dev/urandom"], timeout_s=20)
    finally:
        client.close()
    assert result.exit_code == 0
    return result.stdout


def test_snapshot_is_built_once_and_reused(env: Env) -> None:
    manifest = snapshot.read_manifest(env.ref.directory)
    assert manifest["key"] == env.ref.key
    assert manifest["state_bytes"] == (env.ref.directory / snapshot.STATE_FILE).stat().st_size
    assert manifest["warmed"] is True  # Chromium ran once in the template
    started = time.monotonic()
    again = env.driver.prepare_snapshot("browser")
    assert again == env.ref
    assert time.monotonic() - started < 5.0
    assert snapshot.read_manifest(env.ref.directory)["created_at"] == manifest["created_at"]


def test_restored_vms_have_their_own_secret_and_randomness(env: Env) -> None:
    first, second = env.spec("r1"), env.spec("r2")
    boot1, took1 = env.create(first)
    bytes1 = _urandom(env, first, boot1)  # right after the restore
    boot2, took2 = env.create(second)
    bytes2 = _urandom(env, second, boot2)
    assert boot1.restored and boot2.restored and boot1.warning is None
    assert boot1.endpoint != boot2.endpoint  # each its own forwarded port
    assert bytes1 != bytes2 and len(bytes1) == 32
    # Each refuses the other's secret (and the template had none).
    for boot, other in ((boot1, second), (boot2, first)):
        client = env.driver.agent_client(boot.endpoint, other.agent_secret, timeout=10.0)
        try:
            with pytest.raises(AgentRejected):
                client.health()
        finally:
            client.close()
    for boot, spec in ((boot1, first), (boot2, second)):
        client = env.driver.agent_client(boot.endpoint, spec.agent_secret, timeout=30.0)
        try:
            assert client.health().vm_id == spec.vm_id
            # The guest's network, clock and hostname are the restored VM's own.
            result = client.exec(["sh", "-c", "hostname; date +%s; ip -4 addr show eth0"], timeout_s=20)
        finally:
            client.close()
        lines = result.stdout.decode().splitlines()
        assert lines[0] == spec.vm_id and "10.0.2.15/24" in result.stdout.decode()
        assert abs(int(lines[1]) - time.time()) < 30
    record = json.loads((first.directory / "vm.json").read_text())
    assert record["restored_from"] == env.ref.key
    print(f"restore: {took1:.2f} s and {took2:.2f} s to the agent answering")


def test_a_browser_vm_of_the_product_is_restored(env: Env) -> None:
    """vm_manager's create (what a sign-in's cold path calls) restores from the snapshot the pool's
    loop built, and records it on the VM's boot event."""
    user = users_service.create_user(env.ctx.db, "restoreduser")
    vm = vm_manager.create_vm(env.ctx, Principal(user.id, user.name, False), "browser")
    with env.ctx.db.transaction() as session:
        booted = next(e for e in session.scalars(select(Event).where(Event.vm_id == vm.id))
                      if e.kind == "vm.booted")
    assert vm.status == "running"
    assert booted.details is not None and booted.details["restored"] is True


def test_restore_is_faster_than_cold_boot(env: Env) -> None:
    from bench.snapshot import measure_restore

    figures = measure_restore(env.ctx.settings, driver=env.driver)
    print(figures.summary())
    assert figures.restore_s < figures.cold_s
    assert figures.ratio > 1.5


def test_corrupted_snapshot_falls_back_to_cold_boot(env: Env, caplog: pytest.LogCaptureFixture) -> None:
    state = env.ref.directory / snapshot.STATE_FILE
    original = state.read_bytes()[:65536]
    with open(state, "r+b") as handle:  # same size, garbage where QEMU's header is
        handle.write(b"\xff" * 65536)
    try:
        spec = env.spec("corrupt")
        with caplog.at_level(logging.WARNING, logger="remotecli.qemu"):
            boot, _ = env.create(spec)
        assert not boot.restored
        assert boot.warning is not None and "booted cold" in boot.warning
        assert any("snapshot restore failed" in r.getMessage() for r in caplog.records)
        assert "restored_from" not in json.loads((spec.directory / "vm.json").read_text())
    finally:
        with open(state, "r+b") as handle:
            handle.write(original)


def test_mismatched_snapshot_falls_back_with_an_event(env: Env) -> None:
    manifest_path = env.ref.directory / snapshot.MANIFEST_FILE
    original = manifest_path.read_bytes()
    manifest = json.loads(original)
    manifest["key"] = "0" * 32
    manifest["facts"]["qemu"] = "6.2.0"
    manifest_path.write_text(json.dumps(manifest))
    try:
        user = users_service.create_user(env.ctx.db, "snapuser")
        vm = vm_manager.create_vm(env.ctx, Principal(user.id, user.name, False), "browser")
        with env.ctx.db.transaction() as session:
            events = list(session.scalars(select(Event).where(Event.vm_id == vm.id)))
        fallback = [e for e in events if e.kind == "vm.restore_fallback"]
        assert fallback and "does not fit (stale: qemu changed)" in fallback[0].message
        booted = next(e for e in events if e.kind == "vm.booted")
        assert booted.details is not None and booted.details["restored"] is False
        assert vm.status == "running"
    finally:
        manifest_path.write_bytes(original)
