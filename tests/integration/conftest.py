"""Integration fixtures: real QEMU guests booted from the images in REMOTECLI_TEST_DATA_DIR.

The images are built once (``scripts/test.sh`` builds them, cached by recipe hash); each test gets
its own database (SQLite and PostgreSQL) and its VMs live under the shared data directory's
``vms/`` only while the test runs.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from remotecli import images
from remotecli.config import Settings
from remotecli.context import AppContext
from remotecli.domain.states import VmStatus
from remotecli.services import users as users_service
from remotecli.services import vm_manager
from remotecli.services.users import Principal
from tests.support.net import qemu_pids_naming

REPO = Path(__file__).resolve().parents[2]
TEST_DATA_DIR = Path(os.environ.get("REMOTECLI_TEST_DATA_DIR") or REPO / ".data" / "test-images")


def qemu_settings(db_url: str, data_dir: Path | None = None, **overrides: object) -> Settings:
    """Settings for real guests: VMs in their own data dir, images from the shared, cached build."""
    values: dict[str, object] = {
        # Short paths: the VM directory holds Unix sockets (108-byte path limit).
        "data_dir": data_dir or Path(tempfile.mkdtemp(prefix="rc-")),
        "shared_images_dir": TEST_DATA_DIR / "images", "database_url": db_url, "driver": "qemu",
        # Under TCG on 2 host cores, fewer vCPUs per guest means less contention between guests.
        "cli_vm_memory_mib": 1024, "browser_vm_memory_mib": 1536, "cli_vm_vcpus": 1, "browser_vm_vcpus": 2,
        "vm_boot_timeout_s": 180,
        # No warm pool unless a test asks for one (tests/integration/test_pool.py): every pool VM
        # is a Browser VM booted on this 2-core TCG host.
        "browser_pool_size": 0,
        # No Browser snapshot built in the background either (tests/integration/test_snapshot.py
        # builds its own): a template VM is one more boot on this host.
        "browser_snapshot": False,
    }
    values.update(overrides)
    return Settings(**values)  # type: ignore[arg-type]


def require_images(settings: Settings, *vm_types: str) -> None:
    missing = [t for t in vm_types if images.resolve(settings, t) is None]
    if missing:
        pytest.skip(f"guest images not built for {missing}: run "
                    f"REMOTECLI_DATA_DIR={TEST_DATA_DIR} remotecli images build all (scripts/test.sh does)")


def close_and_clean(ctx: AppContext) -> None:
    """Destroy every VM the context made (even if a test failed midway), close it, remove its data dir."""
    for vm in vm_manager.list_vms(ctx, None):
        if vm.status != VmStatus.DESTROYED.value:
            try:
                vm_manager.destroy_vm(ctx, None, vm.id, reason="test cleanup")
            except Exception:
                ctx.driver.destroy(vm_manager.spec_of(ctx, vm))
    ctx.close()
    shutil.rmtree(ctx.settings.data_dir, ignore_errors=True)
    # Nothing the context started may outlive it (a worker that booted a VM after the test ended
    # once leaked one per run): kill any such QEMU, then fail loudly.
    leaked = _qemu_pids_under(ctx.settings.data_dir)
    for pid in leaked:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
    assert not leaked, f"QEMU processes outlived their test's controller: {leaked}"


def _qemu_pids_under(directory: Path) -> list[int]:
    return qemu_pids_naming(f"{directory}/")


@pytest.fixture
def qctx(db_url: str) -> Iterator[AppContext]:
    """An app context with the real QEMU driver; destroys every VM it made at the end."""
    settings = qemu_settings(db_url)
    require_images(settings, "cli")
    ctx = AppContext.create(settings)
    try:
        yield ctx
    finally:
        close_and_clean(ctx)


@pytest.fixture
def owner(qctx: AppContext) -> Principal:
    user = users_service.create_user(qctx.db, "itest")
    return Principal(user.id, user.name, False)
