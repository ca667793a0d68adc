"""Fault injection: many sign-in flows and VM operations while faults hit at random moments.

Faults (fake driver, in-process controllers):

* ``kill_vm``          a VM's process dies (``FakeDriver.kill``)
* ``delete_dir``       a VM's directory is deleted behind the controller's back (the seed's case)
* ``hang_agent``       a VM's guest agent stops answering (for good)
* ``lose_control``     a VM's control socket stops answering (``inspect`` says UNKNOWN)
* ``restart``          the controller is killed (every later database call of its threads raises,
                       like a SIGKILL: nothing it had in flight commits, its leases are not
                       released) and a new one (new AppContext, runner and loops) starts
* ``drop_db``          the database connections are dropped (SQLite: the engine's pool is
                       disposed; PostgreSQL: ``pg_terminate_backend`` of every other backend)
* ``kill_after_delivery``  armed: the CLI VM that the next sign-in delivered credentials into is
                       killed right after the delivery (the files are in its home volume)
* ``kill_during_write``    armed: the next write into a home through the fake agent (the writer
                       threads write numbered files into their users' homes all run long) is
                       interrupted by a kill of its VM, after the write began and before it landed
* ``kill_during_volume_create``  armed: the controller making the next home volume is killed in the
                       driver's call, before or after the volume file exists (its row stays
                       ``creating`` under a lease nobody renews); a new controller starts and the
                       user's next ensure must give a CLI VM promptly, with one volume

The armed faults are armed once at the start, so every run (the short one too) has them.

At the end (faults stopped): every session must be ``completed`` or ended with a stable error code,
no held credential may be left in a row, and after one garbage-collection pass and one reconciler
pass no process, directory or non-terminal row without a VM behind it may remain. Home volumes
(ADR 0011): every user who ever had a CLI VM still has exactly one live volume row, usable, whose
data the fake driver still holds (every write acknowledged before a kill, every credential file a
killed VM had received); no volume is attached to two VMs (the database, and no two running fake
VMs with the same home); no volume stays attached to an ended or vanished VM after the pass, or
left ``creating``; no volume file is made twice, and one the killed maker completed is the one kept.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import random
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, select, text
from sqlalchemy.orm import Session

from remotecli.background.gc import GarbageCollector
from remotecli.background.loops import BackgroundLoops
from remotecli.background.reconciler import Reconciler
from remotecli.config import Settings
from remotecli.context import AppContext
from remotecli.crypto import SecretBox
from remotecli.db.models import AuthSession, Event, Vm, Volume, utcnow
from remotecli.db.session import Database, normalize_url
from remotecli.domain.states import AUTH_TERMINAL, VM_ENDING, VM_TERMINAL, VOLUME_LIVE, AuthStatus, VmStatus, VmType
from remotecli.drivers.base import Liveness
from remotecli.drivers.fake import FakeDriver
from remotecli.errors import RemotecliError
from remotecli.services import auth_flow, vm_manager, workspaces
from remotecli.services import users as users_service
from remotecli.services.users import Principal

TOKENS: dict[str, object] = {
    "access_token": "at-FAULTS-0123456789abcdef", "refresh_token": "rt-FAULTS-0123456789abcdef",
    "expires_in": 3600, "scope": "openid email offline_access", "token_type": "Bearer",
}
FAULT_KINDS = ("kill_vm", "delete_dir", "hang_agent", "lose_control", "restart", "drop_db",
               "kill_after_delivery", "kill_during_write", "kill_during_volume_create")
#: How often each fault is drawn, relatively (a controller restart every few seconds is plenty).
FAULT_WEIGHTS = (3, 2, 2, 2, 1, 1, 1, 1, 1)
#: Armed faults: drawing one arms it; it counts as injected when it fires.
ARMED_FAULTS = ("kill_after_delivery", "kill_during_write", "kill_during_volume_create")
#: Where the writer threads write in a home (under the cli user's home).
WORK_DIR = "work"
STABLE_CODES = set(auth_flow.FAILURE_MESSAGES)


class FaultDriver(FakeDriver):
    """The fake driver with a hook around making a home volume (``kill_during_volume_create``)."""

    during_volume_create: Callable[[str, Callable[[], None]], None] | None = None

    def create_volume(self, location: str, size_bytes: int, owner_uid: int) -> None:
        def make() -> None:
            super(FaultDriver, self).create_volume(location, size_bytes, owner_uid)

        if self.during_volume_create is None:
            make()
        else:
            self.during_volume_create(location, make)


class ControllerKilled(BaseException):  # a BaseException: nothing may catch it and go on
    """Raised in every thread of a killed controller at its next database call."""


class KillableDatabase(Database):
    """A Database whose controller can be "SIGKILLed": afterwards nothing of it reaches the database."""

    killed = False

    def _check(self) -> None:
        if self.killed:
            raise ControllerKilled()

    @contextlib.contextmanager
    def transaction(self) -> Iterator[Session]:
        self._check()
        with super().transaction() as session:
            yield session
            self._check()  # killed mid-transaction: it never commits

    @contextlib.contextmanager
    def read(self) -> Iterator[Session]:
        self._check()
        with super().read() as session:
            yield session


def fault_settings(data_dir: Path, db_url: str, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "data_dir": data_dir, "database_url": db_url, "driver": "fake",
        "vm_boot_timeout_s": 5, "agent_request_timeout_s": 1,
        "auth_session_ttl_s": 20, "auth_page_timeout_s": 5, "auth_lease_s": 2,
        "reconciler_interval_s": 0.2, "reconciler_wedged_after_s": 4, "reconciler_destroy_retry_after_s": 1,
        "reconciler_orphan_grace_s": 1, "reconciler_lease_s": 5,
        "gc_interval_s": 0.5, "gc_failed_ttl_s": 1,
        "max_live_auth_sessions_per_user": 10, "max_vm_creations_per_user_per_minute": 1000,
        "browser_pool_size": 0,
    }
    values.update(overrides)
    return Settings(**values)


class Controller:
    """One in-process controller: its own engine and background loops (sign-in worker, reconciler, GC)."""

    def __init__(self, settings: Settings, driver: FakeDriver, *, loops: bool = True) -> None:
        settings.ensure_dirs()
        self.db = KillableDatabase(settings.effective_database_url)
        self.db.migrate()  # a no-op once at head, as at every controller start
        self.ctx = AppContext(settings=settings, db=self.db, driver=driver,
                              box=SecretBox.from_key_file(settings.key_file))
        self.background = BackgroundLoops(self.ctx, maintenance=loops, signin_interval_s=0.05)
        self.background.start()

    @property
    def reconciler(self) -> Reconciler:
        assert self.background.reconciler is not None
        return self.background.reconciler

    def kill(self) -> None:
        """SIGKILL, in process: every later database call of this controller's threads raises."""
        self.db.killed = True
        self.background.stop()
        self.db.dispose()

    def stop(self) -> None:
        self.background.stop()


def _quiet_killed_threads() -> None:
    previous = threading.excepthook

    def hook(args: threading.ExceptHookArgs) -> None:
        if args.exc_type is not None and issubclass(args.exc_type, ControllerKilled):
            return
        previous(args)

    threading.excepthook = hook


@dataclass
class Report:
    flows: int = 0
    vm_ops: int = 0
    faults: Counter[str] = field(default_factory=Counter)
    outcomes: Counter[str] = field(default_factory=Counter)
    vm_op_outcomes: Counter[str] = field(default_factory=Counter)
    leaks: list[str] = field(default_factory=list)
    watched: list[str] = field(default_factory=list)
    final_passes: dict[str, object] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    seconds: float = 0.0
    # kill_during_volume_create: from the kill to the volume row settled (made by whoever took it
    # over, or ended by the reconciler), and to the user's next CLI VM with its home (seconds).
    volume_takeover_s: float | None = None
    volume_vm_s: float | None = None

    def text(self) -> str:
        lines = [
            f"flows run: {self.flows}   VM operations: {self.vm_ops}   ({self.seconds:.1f} s)",
            "faults injected: " + (", ".join(f"{k}={v}" for k, v in sorted(self.faults.items())) or "none"),
            "session outcomes: " + ", ".join(f"{k}={v}" for k, v in sorted(self.outcomes.items())),
            "VM operation outcomes: " + ", ".join(f"{k}={v}" for k, v in sorted(self.vm_op_outcomes.items())),
            f"leaks: {len(self.leaks)}" + "".join(f"\n  - {leak}" for leak in self.leaks),
            f"watched (not leaks): {len(self.watched)}" + "".join(f"\n  - {w}" for w in self.watched),
            f"final passes: {self.final_passes}",
            f"volume maker killed -> row settled: {self.volume_takeover_s} s, -> user's CLI VM: {self.volume_vm_s} s",
            f"problems: {len(self.problems)}" + "".join(f"\n  - {p}" for p in self.problems),
        ]
        return "\n".join(lines)


class FaultRun:
    def __init__(self, data_dir: Path, db_url: str, *, flows: int, seed: int, fault_interval_s: float = 0.3,
                 users: int | None = None, boot_delay_s: float = 0.3) -> None:
        self.settings = fault_settings(data_dir, db_url)
        self.db_url = db_url
        self.flows = flows
        self.rng = random.Random(seed)
        self.fault_interval_s = fault_interval_s
        self.n_users = users or max(2, min(8, flows // 3))
        self.driver = FaultDriver(boot_delay_s=boot_delay_s)
        self.driver.login_outcome = ("complete", TOKENS)
        self.report = Report()
        self._lock = threading.Lock()
        self._current: Controller | None = None
        self._faults_on = threading.Event()
        self._done = threading.Event()
        self._flows_done = threading.Event()
        self._last_restart = 0.0
        # Home volumes: what must still be in them at the end: (location, path, content, times
        # written when recorded, what it is). A path written again later may hold newer content.
        self._must_persist: list[tuple[str, str, bytes, int, str]] = []
        self._armed: set[str] = set(ARMED_FAULTS)
        self._delivered_seen: set[str] = set()
        self._had_cli_vm: set[str] = set()  # users given a CLI VM (their rows may be collected by GC)
        self.driver.during_write = self._during_write
        self.driver.during_volume_create = self._during_volume_create
        self._principals: list[Principal] = []
        # kill_during_volume_create: (location, whether the file was made before the kill).
        self._killed_makes: list[tuple[str, bool]] = []

    # -------------------------------------------------------------------------------- helpers
    @property
    def ctx(self) -> AppContext:
        assert self._current is not None
        return self._current.ctx

    def _with_ctx(self) -> AppContext:
        while True:
            with self._lock:
                current = self._current
            if current is not None and not current.db.killed:
                return current.ctx
            time.sleep(0.01)

    # -------------------------------------------------------------------------------- faults
    def _inject(self) -> None:
        rng = random.Random(self.rng.random())
        while not self._done.is_set():
            time.sleep(rng.uniform(0.5, 1.5) * self.fault_interval_s)
            if not self._faults_on.is_set():
                continue
            kind = rng.choices(FAULT_KINDS, FAULT_WEIGHTS)[0]
            try:
                if self._fault(kind, rng):
                    self.report.faults[kind] += 1
            except ControllerKilled:
                pass
            except Exception as exc:  # a fault that could not be injected is not a finding
                self.report.faults[f"{kind}_not_injected:{type(exc).__name__}"] += 1

    def _fault(self, kind: str, rng: random.Random) -> bool:
        if kind in ARMED_FAULTS:
            with self._lock:
                self._armed.add(kind)
            return False  # counted when it fires
        running = sorted(self.driver.running_ids())
        if kind in ("kill_vm", "delete_dir", "hang_agent", "lose_control"):
            if not running:
                return False
            vm_id = rng.choice(running)
            if kind == "kill_vm":
                self.driver.kill(vm_id)
            elif kind == "delete_dir":
                self.driver.delete_directory(vm_id)
            elif kind == "hang_agent":
                with contextlib.suppress(KeyError):
                    self.driver.hang_agent(vm_id)
            else:
                with contextlib.suppress(KeyError):
                    self.driver.lose_control_socket(vm_id)
            return True
        if kind == "restart":
            with self._lock:
                old = self._current
                self._current = None
            if old is not None:
                old.kill()
            with self._lock:
                self._current = Controller(self.settings, self.driver)
                self._last_restart = time.monotonic()
            return True
        if kind == "drop_db":
            with self._lock:
                current = self._current
            if current is None:
                return False
            if current.db.dialect == "postgresql":
                admin = create_engine(normalize_url(self.db_url), isolation_level="AUTOCOMMIT")
                try:
                    with admin.connect() as connection:
                        connection.execute(text(
                            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                            "WHERE datname = current_database() AND pid <> pg_backend_pid()"))
                finally:
                    admin.dispose()
            else:
                current.db.engine.dispose()
            return True
        return False

    def _disarm(self, kind: str) -> bool:
        with self._lock:
            if kind not in self._armed or not self._faults_on.is_set():
                return False
            self._armed.discard(kind)
            return True

    def _during_write(self, vm_id: str, path: str) -> None:
        """The fake agent's hook inside write_file: ``kill_during_write`` fires on a writer's file."""
        if f"/{WORK_DIR}/" in path and self._disarm("kill_during_write"):
            self.driver.kill(vm_id)
            self.report.faults["kill_during_write"] += 1

    def _during_volume_create(self, location: str, make: Callable[[], None]) -> None:
        """``kill_during_volume_create``: the controller making a home volume dies in the driver
        call (before or after the file is made); a new controller starts, and the user's next
        ensure is timed."""
        if not self._disarm("kill_during_volume_create"):
            make()
            return
        with self._lock:
            victim = self._current
            file_first = self.rng.random() < 0.5
        if victim is None:
            make()
            return
        if file_first:
            make()
        victim.db.killed = True  # SIGKILL: from now on nothing of it reaches the database
        killed_at = utcnow()
        self._killed_makes.append((location, file_first))
        self.report.faults["kill_during_volume_create"] += 1
        threading.Thread(target=self._after_volume_kill, args=(victim, location, killed_at),
                         name="faults-volume-kill", daemon=True).start()
        raise ControllerKilled()

    def _after_volume_kill(self, victim: Controller, location: str, killed_at: dt.datetime) -> None:
        with self._lock:
            restart = self._current is victim
            if restart:
                self._current = None
        if restart:
            victim.kill()
            with self._lock:
                self._current = Controller(self.settings, self.driver)
                self._last_restart = time.monotonic()
        volume_id = Path(location).name.removesuffix(".ext4")
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                ctx = self._with_ctx()
                with ctx.db.read() as session:
                    user_id = session.scalar(select(Volume.user_id).where(Volume.id == volume_id))
                principal = next(p for p in self._principals if p.user_id == user_id)
                vm, _created = vm_manager.ensure_cli_vm(ctx, principal)
                if self.driver.home_of(vm.id) is not None:
                    self.report.volume_vm_s = round((utcnow() - killed_at).total_seconds(), 2)
                    with ctx.db.read() as session:
                        settled = [e.at for e in session.scalars(select(Event).where(
                            Event.kind == "volume.status", Event.user_id == user_id,
                            Event.from_status == "creating", Event.at > killed_at))]
                    if settled:
                        self.report.volume_takeover_s = round((min(settled) - killed_at).total_seconds(), 2)
                    return
            except (ControllerKilled, Exception):
                time.sleep(0.05)
        self.report.problems.append(f"no CLI VM with its home within 60 s after the maker of {volume_id} was killed")

    def _watch_deliveries(self) -> None:
        """``kill_after_delivery``: kill the CLI VM of the next delivery once it has its files."""
        while not self._done.is_set():
            time.sleep(0.05)
            with self._lock:
                current = self._current
            if current is None or current.db.killed:
                continue
            try:
                with current.db.read() as session:
                    rows = list(session.execute(select(AuthSession.id, AuthSession.cli_vm_id, AuthSession.provider)
                                                .where(AuthSession.delivered_at.is_not(None))).all())
            except (ControllerKilled, Exception):
                continue
            for session_id, vm_id, provider in rows:
                if session_id in self._delivered_seen:
                    continue
                self._delivered_seen.add(session_id)
                location = self.driver.home_of(vm_id) if vm_id else None
                if vm_id not in self.driver.running_ids() or location is None or not self._disarm(
                        "kill_after_delivery"):
                    continue
                self.driver.kill(vm_id)
                self.report.faults["kill_after_delivery"] += 1
                # What the killed VM had received must still be in its home volume at the end.
                for path, (data, written) in self.driver.volume_files(location).items():
                    if f"/{WORK_DIR}/" not in path:
                        self._must_persist.append((location, path, data, written, f"{provider} sign-in file"))

    # -------------------------------------------------------------------------------- work
    def _flow_worker(self, principal: Principal, count: int, session_ids: list[str]) -> None:
        providers = ["claude_code", "codex", "gemini"]
        for index in range(count):
            session_id = None
            for _attempt in range(50):
                try:
                    auth = auth_flow.start_session(self._with_ctx(), principal, providers[index % 3])
                    session_id = auth.id
                    break
                except (ControllerKilled, RemotecliError, Exception):
                    time.sleep(0.05)
            if session_id is None:
                self.report.problems.append(f"could not start a session for {principal.name}")
                continue
            session_ids.append(session_id)
            self.report.flows += 1
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                try:
                    status = auth_flow.get_session(self._with_ctx(), None, session_id).status
                except (ControllerKilled, Exception):
                    time.sleep(0.05)
                    continue
                if AuthStatus(status) in AUTH_TERMINAL:
                    break
                time.sleep(0.05)

    def _vm_ops_worker(self, principal: Principal, ops: int) -> None:
        rng = random.Random(self.rng.random())
        for _ in range(ops):
            op = rng.choice(["ensure", "ensure", "exec", "stop", "pause_resume"])
            try:
                ctx = self._with_ctx()
                vm, _created = vm_manager.ensure_cli_vm(ctx, principal)
                self._had_cli_vm.add(principal.user_id)
                if op == "exec":
                    agent = ctx.agent(vm, timeout=1)
                    try:
                        agent.health()
                    finally:
                        agent.close()
                elif op == "stop":
                    vm_manager.stop_vm(ctx, None, vm.id)
                elif op == "pause_resume":
                    vm_manager.pause_vm(ctx, None, vm.id)
                    vm_manager.resume_vm(ctx, None, vm.id)
                self.report.vm_op_outcomes["ok"] += 1
            except ControllerKilled:
                self.report.vm_op_outcomes["controller_killed"] += 1
            except RemotecliError as exc:
                self.report.vm_op_outcomes[exc.code] += 1
            except Exception as exc:
                self.report.vm_op_outcomes[type(exc).__name__] += 1
            self.report.vm_ops += 1
            time.sleep(rng.uniform(0.02, 0.1))

    def _writer(self, principal: Principal) -> None:
        """Numbered files written into the user's home through the (fake) agent while the sign-ins
        run; each write the agent acknowledged must be in the home volume at the end."""
        home = self.settings.cli_guest_home.rstrip("/")
        rng = random.Random(self.rng.random())
        index = 0
        while not self._flows_done.is_set():
            time.sleep(rng.uniform(0.1, 0.25))
            index += 1
            path = f"{home}/{WORK_DIR}/{principal.name}-{index:05d}.txt"
            data = f"{principal.name} record {index} {rng.random()}\n".encode()
            try:
                ctx = self._with_ctx()
                vm, _created = vm_manager.ensure_cli_vm(ctx, principal)
                self._had_cli_vm.add(principal.user_id)
                location = self.driver.home_of(vm.id)
                agent = ctx.agent(vm, timeout=1)
                try:
                    agent.write_file(path, data, mode=0o644, owner="cli")
                finally:
                    agent.close()
            except (ControllerKilled, Exception):
                self.report.vm_op_outcomes["write_interrupted"] += 1
                continue
            if location is None:
                self.report.problems.append(f"CLI VM {vm.id} of {principal.name} has no home volume")
                continue
            self.report.vm_op_outcomes["write_ok"] += 1
            self._must_persist.append((location, path, data, 1, "acknowledged write"))

    # -------------------------------------------------------------------------------- run
    def run(self) -> Report:
        _quiet_killed_threads()
        started = time.monotonic()
        self._current = Controller(self.settings, self.driver)
        principals = []
        for i in range(self.n_users):
            user = users_service.create_user(self.ctx.db, f"fault{i}")
            principals.append(Principal(user.id, user.name, False))
        self._principals = principals
        per_user = [self.flows // self.n_users + (1 if i < self.flows % self.n_users else 0)
                    for i in range(self.n_users)]
        session_ids: list[str] = []
        injector = threading.Thread(target=self._inject, name="faults", daemon=True)
        watcher = threading.Thread(target=self._watch_deliveries, name="faults-deliveries", daemon=True)
        writers = [threading.Thread(target=self._writer, args=(p,), daemon=True)
                   for p in principals[: max(1, self.n_users // 2)]]
        threads = [threading.Thread(target=self._flow_worker, args=(p, n, session_ids), daemon=True)
                   for p, n in zip(principals, per_user, strict=True) if n]
        threads += [threading.Thread(target=self._vm_ops_worker, args=(p, max(3, self.flows // self.n_users)),
                                     daemon=True) for p in principals[: max(1, self.n_users // 2)]]
        self._faults_on.set()
        injector.start()
        watcher.start()
        for thread in threads + writers:
            thread.start()
        for thread in threads:
            thread.join(300)
        self._flows_done.set()
        for thread in writers:
            thread.join(120)
        self._faults_on.clear()
        self._done.set()
        injector.join(30)
        watcher.join(30)
        self._settle(session_ids)
        self._final_checks(session_ids)
        self.report.seconds = time.monotonic() - started
        return self.report

    def _settle(self, session_ids: list[str]) -> None:
        """Faults are off: let every session end (the live controller's runner and loops)."""
        deadline = time.monotonic() + 90
        transient = [VmStatus.CREATING.value, VmStatus.STARTING.value, VmStatus.STOPPING.value,
                     VmStatus.DESTROYING.value]
        while time.monotonic() < deadline:
            with self.ctx.db.read() as session:
                live = session.scalar(select(AuthSession.id).where(
                    AuthSession.status.not_in([s.value for s in AUTH_TERMINAL])).limit(1))
                # Rows a killed controller left mid-boot: the live reconciler fails them once wedged.
                wedged = session.scalar(select(Vm.id).where(Vm.status.in_(transient)).limit(1))
            if live is None and wedged is None:
                break
            time.sleep(0.1)
        # Leases a killed controller held (VMs, orphans, volumes being made) lapse: wait them out,
        # as a restarted controller would.
        longest = max(self.settings.reconciler_lease_s, workspaces.CREATING_LEASE_S)
        remaining = longest + 0.5 - (time.monotonic() - self._last_restart)
        if remaining > 0:
            time.sleep(remaining)

    def _final_checks(self, session_ids: list[str]) -> None:
        assert self._current is not None
        self._current.stop()
        ctx = self.ctx
        # One reconciler pass (orphan grace 0), then one GC pass (TTL 0: failed VMs go now, where
        # normally they would stay 30 minutes for the post-mortem).
        Reconciler(ctx, orphan_grace_s=0).run_once()
        gc_report = GarbageCollector(ctx, failed_ttl_s=0).run_once()
        self.report.final_passes = {"gc": dict(Counter(f"{f.kind}:{f.result}" for f in gc_report.findings)),
                                    "gc_errors": gc_report.errors}
        with ctx.db.read() as session:
            sessions = list(session.scalars(select(AuthSession)))
            vms = list(session.scalars(select(Vm)))
            delivered = {e.session_id for e in session.scalars(select(Event).where(Event.kind == "auth.delivered"))}
        for auth in sessions:
            if auth.status == AuthStatus.COMPLETED.value:
                self.report.outcomes["completed"] += 1
                if auth.id not in delivered or auth.delivered_at is None:
                    self.report.problems.append(f"session {auth.id} completed without a delivery")
            elif AuthStatus(auth.status) in AUTH_TERMINAL:
                code = auth.error_code or auth.status
                self.report.outcomes[f"{auth.status}:{code}"] += 1
                if auth.status == AuthStatus.FAILED.value and code not in STABLE_CODES:
                    self.report.problems.append(f"session {auth.id} failed with unstable code {code!r}")
            else:
                self.report.outcomes[f"stuck:{auth.status}"] += 1
                self.report.problems.append(f"session {auth.id} still {auth.status}")
            if auth.credential_enc is not None:
                self.report.leaks.append(f"session {auth.id} ({auth.status}) still holds a credential")
        live = {vm.id: vm for vm in vms if VmStatus(vm.status) not in VM_TERMINAL}
        for vm_id in sorted(self.driver.running_ids() - set(live)):
            self.report.leaks.append(f"process of {vm_id} runs but no live row owns it")
        vms_dir = ctx.settings.vms_dir
        for path in sorted(vms_dir.iterdir()) if vms_dir.is_dir() else []:
            if path.name not in live:
                row = next((vm for vm in vms if vm.id == path.name), None)
                self.report.leaks.append(
                    f"directory {path.name} left on the host (row: {row.status if row else 'none'}"
                    + (f", changed {row.status_changed_at}, lease {row.lease_owner} until {row.lease_expires_at}"
                       if row else "") + ")")
        for vm in live.values():
            status = VmStatus(vm.status)
            spec = vm_manager.spec_of(ctx, vm)
            if status in (VmStatus.RUNNING, VmStatus.PAUSED):
                inspection = ctx.driver.inspect(spec)
                if inspection.liveness is Liveness.UNKNOWN and vm.unknown_strikes == 1:
                    self.report.watched.append(f"{vm.id}: one UNKNOWN so far (the next pass fails it)")
                elif inspection.liveness is not Liveness.ALIVE:
                    self.report.leaks.append(f"row {vm.id} is {status.value} but the VM is {inspection.reason}")
            elif status is VmStatus.STOPPED:
                if not spec.directory.is_dir():
                    self.report.leaks.append(f"row {vm.id} is stopped but its directory is gone")
            else:
                self.report.leaks.append(f"row {vm.id} left in {status.value}")
        self._volume_checks(ctx, vms)
        ctx.close()

    def _volume_checks(self, ctx: AppContext, vms: list[Vm]) -> None:
        """After the final passes: no home volume lost, none attached twice or to an ended VM."""
        with ctx.db.read() as session:
            volumes = list(session.scalars(select(Volume)))
        rows = {vm.id: vm for vm in vms}
        with ctx.db.read() as session:
            delivered_to = set(session.scalars(select(AuthSession.user_id).where(AuthSession.cli_vm_id.is_not(None))))
        cli_users = {vm.user_id for vm in vms if vm.vm_type == VmType.CLI.value} | self._had_cli_vm | delivered_to
        live_values = {s.value for s in VOLUME_LIVE}
        by_user: dict[str, list[Volume]] = {}
        for volume in volumes:
            if volume.status in live_values:
                by_user.setdefault(volume.user_id, []).append(volume)
        for user_id in sorted(cli_users):
            mine = by_user.get(user_id, [])
            if len(mine) != 1:
                self.report.problems.append(f"user {user_id} had a CLI VM and has {len(mine)} live volumes")
        for volume in volumes:
            if volume.status not in live_values:
                continue
            if volume.status in ("failed", "creating"):  # a dead maker's row is settled by the pass
                self.report.problems.append(f"volume {volume.id} is {volume.status} ({volume.status_reason})")
            problem = self.driver.volume_problem(volume.location)
            if problem is not None:
                self.report.problems.append(f"volume {volume.id}: {problem}")
            if volume.location not in self.driver.volumes:
                self.report.problems.append(f"volume {volume.id}: the fake driver no longer holds its data")
            if volume.attached_vm_id is not None:
                holder = rows.get(volume.attached_vm_id)
                if holder is None or VmStatus(holder.status) in VM_ENDING:
                    self.report.leaks.append(
                        f"volume {volume.id} still attached to VM {volume.attached_vm_id} "
                        f"({holder.status if holder else 'no row'}) after a reconciler pass")
                elif holder.user_id != volume.user_id:
                    self.report.problems.append(f"volume {volume.id} attached to another user's VM {holder.id}")
        made = Counter(call[1] for call in self.driver.calls if call[0] == "create_volume")
        for location, count in made.items():
            if count > 1:
                self.report.problems.append(f"volume file {location} was made {count} times")
        live_at = {v.location for v in volumes if v.status in live_values}
        for location, file_first in self._killed_makes:
            if file_first and location not in live_at:
                self.report.problems.append(f"the volume file {location} its killed maker completed was not kept")
        self.report.final_passes["volume_makers_killed"] = len(self._killed_makes)
        if self.driver.double_attach:
            self.report.problems.append(f"a volume was attached to two VMs at once: {self.driver.double_attach}")
        homes = Counter(h for h in (self.driver.home_of(vm_id) for vm_id in self.driver.running_ids()) if h)
        for location, count in homes.items():
            if count > 1:
                self.report.problems.append(f"volume {location} is in {count} running VMs")
        lost = 0
        for location, path, data, written, what in self._must_persist:
            now = self.driver.volume_files(location).get(path)
            if now is None or (now[1] == written and now[0] != data):
                lost += 1
                self.report.problems.append(f"{what} {path} lost from volume {Path(location).name}")
        self.report.final_passes["volume_data_checked"] = len(self._must_persist) - lost


def run(data_dir: Path, db_url: str, *, flows: int, seed: int) -> Report:
    return FaultRun(data_dir, db_url, flows=flows, seed=seed).run()
