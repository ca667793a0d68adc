"""Two controllers on one PostgreSQL database under churn: no VM reconciled by both at once.

Every reconciler check writes an audit event (``reconcile.checked``) carrying the controller id
and the interval during which it held the VM's lease; intervals of different controllers on the
same VM must never overlap. ``REMOTECLI_CHURN_S`` sets the churn time (default 20 s; a couple of
minutes for the long form).
"""

from __future__ import annotations

import datetime as dt
import os
import random
import threading
import time
from collections import defaultdict
from pathlib import Path

import pytest
from sqlalchemy import delete, select

from remotecli.db.models import Event, Vm
from remotecli.domain.states import VM_TERMINAL
from remotecli.drivers.fake import FakeDriver
from remotecli.errors import RemotecliError
from remotecli.services import users as users_service
from remotecli.services import vm_manager
from remotecli.services.users import Principal
from tests.faults.harness import Controller, fault_settings


def test_two_controllers_share_the_work_without_overlap(tmp_path: Path, db_url: str) -> None:
    if not db_url.startswith("postgresql"):
        pytest.skip("several controllers on one database need PostgreSQL (SQLite: one process)")
    churn_s = float(os.environ.get("REMOTECLI_CHURN_S", "20"))
    driver = FakeDriver()
    settings = fault_settings(tmp_path / "data", db_url, reconciler_audit_events=True, reconciler_interval_s=0.05,
                              reconciler_batch_size=7, reconciler_orphan_grace_s=0.5, gc_interval_s=0.3)
    a = Controller(settings, driver)
    b = Controller(settings, driver)
    users = []
    for i in range(6):
        user = users_service.create_user(a.ctx.db, f"churn{i}")
        users.append(Principal(user.id, user.name, False))
    rng = random.Random(5)
    stop = threading.Event()
    ensured: dict[str, set[str]] = defaultdict(set)

    def churn(seed: int) -> None:
        local = random.Random(seed)
        while not stop.is_set():
            ctx = local.choice([a, b]).ctx
            user = local.choice(users)
            action = local.choice(["ensure", "ensure", "browser", "kill", "rmdir", "delete_row", "destroy"])
            try:
                if action == "ensure":
                    vm, _ = vm_manager.ensure_cli_vm(ctx, user)
                    ensured[user.user_id].add(vm.id)
                elif action == "browser":
                    vm_manager.create_vm(ctx, user, "browser")
                else:
                    running = sorted(driver.running_ids())
                    if not running:
                        continue
                    vm_id = local.choice(running)
                    if action == "kill":
                        driver.kill(vm_id)
                    elif action == "rmdir":
                        driver.delete_directory(vm_id)
                    elif action == "delete_row":
                        with ctx.db.transaction() as session:
                            session.execute(delete(Vm).where(Vm.id == vm_id))
                    else:
                        vm_manager.destroy_vm(ctx, None, vm_id)
            except RemotecliError:
                pass
            time.sleep(local.uniform(0.01, 0.05))

    threads = [threading.Thread(target=churn, args=(rng.random(),), daemon=True) for _ in range(3)]
    for thread in threads:
        thread.start()
    time.sleep(churn_s)
    stop.set()
    for thread in threads:
        thread.join(30)
    a.stop()
    b.stop()

    with a.ctx.db.read() as session:
        audits = list(session.scalars(select(Event).where(Event.kind == "reconcile.checked")))
        live_cli = list(session.execute(select(Vm.user_id, Vm.id).where(
            Vm.vm_type == "cli", Vm.status.not_in([s.value for s in VM_TERMINAL]))).all())
    by_vm: dict[str, list[tuple[dt.datetime, dt.datetime, str]]] = defaultdict(list)
    controllers = set()
    for event in audits:
        details = event.details or {}
        controllers.add(details["controller"])
        by_vm[event.vm_id or ""].append((dt.datetime.fromisoformat(details["lease_from"]),
                                         dt.datetime.fromisoformat(details["lease_to"]), details["controller"]))
    assert controllers == {a.reconciler.owner, b.reconciler.owner}, "both controllers did work"
    overlaps = []
    for vm_id, intervals in by_vm.items():
        intervals.sort()
        latest_end: dict[str, dt.datetime] = {}  # per controller, the end of its latest-ending lease
        for start, end, controller in intervals:
            for other, other_end in latest_end.items():
                if other != controller and start < other_end:
                    overlaps.append((vm_id, other, controller, other_end - start))
            latest_end[controller] = max(end, latest_end.get(controller, end))
    print(f"{len(audits)} checks of {len(by_vm)} VMs by 2 controllers in {churn_s:.0f} s; overlaps: {len(overlaps)}")
    assert not overlaps, overlaps[:5]
    per_user = defaultdict(list)
    for user_id, vm_id in live_cli:
        per_user[user_id].append(vm_id)
    assert all(len(ids) == 1 for ids in per_user.values()), per_user
    a.ctx.close()
    b.ctx.close()
