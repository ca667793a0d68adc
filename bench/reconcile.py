#!/usr/bin/env python3
"""Duration of one reconciler pass over 1,000 and 10,000 VM rows (fake driver, real database).

Every row is a ``running`` CLI VM whose fake VM runs and whose directory exists, so a pass does the
full steady-state work: list, lease in batches, inspect every VM, list the host, look for orphans,
release. Prints the median of ``--passes`` passes per size, on SQLite and (with ``--postgres URL``)
on a fresh database on that PostgreSQL server.

Usage: bench/reconcile.py [--sizes 1000,10000] [--passes 5] [--postgres postgresql://...]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

from sqlalchemy import create_engine, insert, text
from sqlalchemy.engine import make_url

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from remotecli.background.reconciler import Reconciler  # noqa: E402
from remotecli.config import Settings  # noqa: E402
from remotecli.context import AppContext  # noqa: E402
from remotecli.db.models import User, Vm, utcnow  # noqa: E402
from remotecli.db.session import normalize_url  # noqa: E402
from remotecli.drivers.base import VmSpec  # noqa: E402
from remotecli.drivers.fake import FakeDriver, _FakeVm  # noqa: E402


def populate(ctx: AppContext, driver: FakeDriver, count: int) -> None:
    now = utcnow()
    users, vms = [], []
    for index in range(count):
        user_id = str(uuid.uuid4())
        vm_id = f"vm-{uuid.uuid4()}"
        directory = ctx.settings.vms_dir / vm_id
        directory.mkdir()
        users.append({"id": user_id, "name": f"u{index}", "is_admin": False, "disabled": False, "created_at": now})
        vms.append({"id": vm_id, "user_id": user_id, "vm_type": "cli", "status": "running", "driver": "fake",
                    "vcpus": 1, "memory_mib": 256, "directory": str(directory), "endpoint": f"fake://{vm_id}",
                    "agent_secret_enc": b"x", "generation": 2, "created_at": now, "updated_at": now,
                    "status_changed_at": now, "unknown_strikes": 0})
        spec = VmSpec(vm_id=vm_id, vm_type="cli", vcpus=1, memory_mib=256, directory=directory, agent_secret="")
        driver._vms[vm_id] = _FakeVm(spec=spec, pid=100_000 + index)
    with ctx.db.transaction() as session:
        for start in range(0, count, 1000):
            session.execute(insert(User), users[start : start + 1000])
            session.execute(insert(Vm), vms[start : start + 1000])


def measure(url: str, count: int, passes: int) -> list[float]:
    with tempfile.TemporaryDirectory(prefix="rcli-bench-") as tmp:
        settings = Settings(data_dir=Path(tmp) / "data", database_url=url, driver="fake")
        driver = FakeDriver()
        ctx = AppContext.create(settings, driver=driver)
        try:
            populate(ctx, driver, count)
            reconciler = Reconciler(ctx)
            durations = []
            for _ in range(passes):
                started = time.perf_counter()
                report = reconciler.run_once()
                durations.append(time.perf_counter() - started)
                assert report.errors == 0 and not report.findings, report.findings[:3]
            return durations
        finally:
            ctx.close()


def fresh_pg(base: str) -> tuple[str, str]:
    name = f"rcli_bench_{uuid.uuid4().hex[:10]}"
    admin = create_engine(normalize_url(base), isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    admin.dispose()
    return make_url(normalize_url(base)).set(database=name).render_as_string(hide_password=False), name


def drop_pg(base: str, name: str) -> None:
    admin = create_engine(normalize_url(base), isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1000,10000")
    parser.add_argument("--passes", type=int, default=5)
    parser.add_argument("--postgres", metavar="URL", default=None)
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    print(f"{'database':12} {'rows':>7} {'median s':>9} {'min s':>7} {'max s':>7} {'ms/VM':>7}")
    targets = [("sqlite", None)] + ([("postgresql", args.postgres)] if args.postgres else [])
    for label, base in targets:
        for count in sizes:
            if base is None:
                with tempfile.TemporaryDirectory() as tmp:
                    durations = measure(f"sqlite:///{tmp}/bench.db", count, args.passes)
            else:
                url, name = fresh_pg(base)
                try:
                    durations = measure(url, count, args.passes)
                finally:
                    drop_pg(base, name)
            median = statistics.median(durations)
            print(f"{label:12} {count:>7} {median:>9.3f} {min(durations):>7.3f} {max(durations):>7.3f} "
                  f"{1000 * median / count:>7.3f}", flush=True)


if __name__ == "__main__":
    main()
