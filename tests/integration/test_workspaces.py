"""Persistent workspaces with real QEMU guests (ADR 0011): the home survives the seed's case (QEMU
killed, VM directory deleted), a rebuild, a kill -9 in the middle of fsynced writes, a controller
SIGKILL and restart (the new controller adopts the running VM), and an idle stop and start.

The seed's case begins with a real sign-in: the user signs in at the test IdP (an httpx client
playing the Browser VM, ``tests/support/idp_login.py``), the controller captures the IdP's token
response and delivers the files through its own path (``services.credentials``), and after the
kill and ``ensure`` the real Claude Code in the new VM, offline, still says it is signed in.

Run under the shared lock: ``flock /tmp/remotecli-vm-tests.lock .venv/bin/python -m pytest
tests/integration/test_workspaces.py``. Each boot costs about half a minute, so the seed's case
and the controller restart run on SQLite and PostgreSQL, the rest on SQLite; the database side of
every flow runs on both in tests/unit/test_workspaces.py.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from remotecli.context import AppContext
from remotecli.db.models import AuthSession, Vm
from remotecli.domain.states import AuthStatus
from remotecli.services import auth_flow, credentials, vm_exec, vm_manager, workspaces
from remotecli.services.signin_state import move
from remotecli.services.users import Principal
from tests.support.cli_judge import assert_cli_signed_in
from tests.support.idp_login import sign_in_at_idp
from tests.support.idp_server import CLIENT_IDS, Idp, run_idp
from tests.support.net import process_gone, qemu_pids_naming

pytestmark = [pytest.mark.integration, pytest.mark.slow]
SQLITE = pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
BOTH_DATABASES = pytest.mark.parametrize("db_url", ["sqlite", "postgresql"], indirect=True)

IDP_PASSWORD = "workspace-idp-password"
PLANTED_ACCESS = "at-planted-workspace-4c2e8a1f"
PLANTED_REFRESH = "rt-planted-workspace-9b7d3e5a"


@pytest.fixture
def idp() -> Iterator[Idp]:
    with run_idp(password=IDP_PASSWORD, planted_access_token=PLANTED_ACCESS,
                 planted_refresh_token=PLANTED_REFRESH) as server:
        yield server


def _sign_in(ctx: AppContext, owner: Principal, idp: Idp, monkeypatch: pytest.MonkeyPatch) -> AuthSession:
    """A Claude Code sign-in of ``owner`` as IdP user alice, delivered by the controller's own
    capture and delivery (what the sign-in worker does once the Browser VM's OAuth agent has the
    token response); the Browser VM's part is played by ``sign_in_at_idp``."""
    prefix = "REMOTECLI_PROVIDER_CLAUDE_CODE_"
    monkeypatch.setenv(prefix + "AUTHORIZE_URL", f"{idp.issuer}/auth")
    monkeypatch.setenv(prefix + "TOKEN_URL", f"{idp.issuer}/token")
    monkeypatch.setenv(prefix + "CLIENT_ID", CLIENT_IDS["claude_code"])
    # user:inference + user:profile: without them Claude Code calls the login "none" (not claude.ai).
    monkeypatch.setenv(prefix + "SCOPES", "openid email offline_access user:profile user:inference")
    ctx.providers.reload()
    profile = ctx.providers["claude_code"]
    auth = auth_flow.start_session(ctx, owner, "claude_code")
    move(ctx, auth, AuthStatus.PROVISIONING)
    move(ctx, auth, AuthStatus.AWAITING_USER, f"Log in to {profile.display_name} below")
    tokens = sign_in_at_idp(idp, profile.oauth_spec(f"flow-{auth.id}"), "alice", IDP_PASSWORD)
    credentials.capture(ctx, auth, profile, tokens)
    credentials.deliver(ctx, auth, profile)
    done = auth_flow.get_session(ctx, owner, auth.id)
    assert done.status == "completed" and done.delivered_at is not None and done.credential_enc is None
    assert (done.credential_meta or {}).get("account") == "alice@example.test"
    return done


def _sh(ctx: AppContext, owner: Principal, vm: Vm, script: str, *, user: str = "cli", timeout: float = 60) -> str:
    result = vm_exec.exec_in_vm(ctx, owner, vm.id, ["bash", "-c", script], timeout_s=timeout, user=user)
    assert result.exit_code == 0, (script, result.stdout, result.stderr)
    return result.stdout.decode()


def _qemu_pid(vm: Vm) -> int:
    return int((Path(vm.directory) / "qemu.pid").read_text().strip())


def _home_report(ctx: AppContext, vm: Vm) -> dict[str, object]:
    agent = ctx.agent(vm)
    try:
        return dict(json.loads(agent.read_file(workspaces.HOME_STATUS_PATH).data))
    finally:
        agent.close()


def _assert_home_is_the_volume(ctx: AppContext, owner: Principal, vm: Vm) -> None:
    volume = workspaces.attached_to(ctx, vm.id)
    assert volume is not None and volume.status == "attached"
    report = _home_report(ctx, vm)
    assert report["volume_id"] == volume.id and report["state"] == "mounted" and report["fsck"] in (0, 1)
    source = _sh(ctx, owner, vm, "findmnt -no SOURCE,FSTYPE /home/cli").split()
    assert source == [str(report["device"]), "ext4"]
    # e2fsck -p really ran before the mount (in preen mode it names the filesystem by its label).
    assert _sh(ctx, owner, vm, "cat /run/remotecli/home-fsck.log", user="root").startswith("rc-home:")


def _assert_work_is_there(ctx: AppContext, owner: Principal, vm: Vm, credential: bytes) -> None:
    assert _sh(ctx, owner, vm, "cat ~/notes.txt") == "my work\n"
    assert _sh(ctx, owner, vm, "git -C ~/project log --format=%s") == "first commit\n"
    assert _sh(ctx, owner, vm, "git -C ~/project status --porcelain") == ""
    assert _sh(ctx, owner, vm, "stat -c '%a %U' ~/.claude/.credentials.json") == "600 cli\n"
    assert _sh(ctx, owner, vm, "cat ~/.claude/.credentials.json").encode() == credential
    # The real Claude Code, offline, still says it is signed in: no new sign-in needed.
    assert_cli_signed_in(ctx, vm.id, "claude_code")


@BOTH_DATABASES
def test_home_survives_the_seeds_case_and_a_rebuild(qctx: AppContext, owner: Principal, idp: Idp,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    first, created = vm_manager.ensure_cli_vm(qctx, owner)
    assert created
    _assert_home_is_the_volume(qctx, owner, first)
    # A fresh volume was seeded with the image's home skeleton and belongs to the cli user.
    assert _sh(qctx, owner, first, "stat -c %U ~ && test -f ~/.bashrc && cat ~/.remotecli-home").split() == [
        "cli", workspaces.attached_to(qctx, first.id).id]  # type: ignore[union-attr]
    _sh(qctx, owner, first, """set -e
        echo 'my work' > ~/notes.txt
        mkdir ~/project && cd ~/project && git init -q && echo 'print(1)' > main.py && git add main.py
        git -c user.name=Test -c user.email=test@example.invalid commit -qm 'first commit'
        mkdir -p ~/.claude && chmod 700 ~/.claude""")
    # Sign in: the credentials are delivered into the running CLI VM, i.e. into its home volume.
    signed_in = _sign_in(qctx, owner, idp, monkeypatch)
    assert signed_in.cli_vm_id == first.id
    credential = _sh(qctx, owner, first, "cat ~/.claude/.credentials.json").encode()
    assert json.loads(credential)["claudeAiOauth"]["accessToken"] == PLANTED_ACCESS
    _sh(qctx, owner, first, "sync")
    assert_cli_signed_in(qctx, first.id, "claude_code")

    # The seed's case: QEMU killed, the VM's directory deleted behind the controller's back.
    pid = _qemu_pid(first)
    os.kill(pid, signal.SIGKILL)
    assert process_gone(pid, 10)
    shutil.rmtree(first.directory)
    second, created = vm_manager.ensure_cli_vm(qctx, owner)
    assert created and second.id != first.id
    _assert_home_is_the_volume(qctx, owner, second)
    _assert_work_is_there(qctx, owner, second, credential)  # ends with the real CLI's offline verdict
    assert vm_manager.get_vm(qctx, owner, first.id).status == "failed"
    with qctx.db.read() as session:  # no new sign-in: the one session, delivered once, to the first VM
        from sqlalchemy import func, select

        assert session.scalar(select(func.count()).select_from(AuthSession)) == 1
    # Usage as the guest's filesystem sees it (GET /api/v1/workspace).
    _, usage = workspaces.my_workspace(qctx, owner.user_id)
    assert usage.used_bytes is not None and usage.total_bytes is not None
    assert 0 < usage.used_bytes < usage.total_bytes <= qctx.settings.workspace_size_gib * 1024**3
    if qctx.db.dialect == "postgresql":
        return  # the rebuild below is the same on both databases past this point (unit tests: both)

    # A rebuild: a new VM on the current image, the same home; the old one is gone.
    _sh(qctx, owner, second, "echo 'more work' >> ~/notes.txt && sync")
    third = vm_manager.rebuild_cli_vm(qctx, owner, second.id)
    assert third.id != second.id and third.status == "running"
    assert vm_manager.get_vm(qctx, owner, second.id).status == "destroyed"
    assert not Path(second.directory).exists()
    _assert_home_is_the_volume(qctx, owner, third)
    assert _sh(qctx, owner, third, "cat ~/notes.txt") == "my work\nmore work\n"
    assert _sh(qctx, owner, third, "git -C ~/project log --format=%s") == "first commit\n"
    assert _sh(qctx, owner, third, "stat -c '%a %U' ~/.claude/.credentials.json") == "600 cli\n"
    assert_cli_signed_in(qctx, third.id, "claude_code")
    # The old VM was shut down cleanly: its successor found the filesystem clean (no journal replay).
    assert _home_report(qctx, third)["fsck"] == 0, _sh(qctx, owner, third, "cat /run/remotecli/home-fsck.log",
                                                       user="root")
    [volume] = workspaces.list_volumes(qctx)
    assert volume.attached_vm_id == third.id


WRITER = r"""
import os
fd = os.open("/home/cli/fsynced.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
console = os.open("/dev/ttyS0", os.O_WRONLY | os.O_NOCTTY)
i = 0
while True:
    os.write(fd, b"record %08d %s\n" % (i, b"x" * 200))
    os.fsync(fd)
    os.write(console, b"FSYNCED %d\n" % i)
    i += 1
"""


@SQLITE
def test_kill_during_fsynced_writes_loses_nothing_and_leaves_a_clean_filesystem(
    qctx: AppContext, owner: Principal
) -> None:
    vm, _ = vm_manager.ensure_cli_vm(qctx, owner)
    volume = workspaces.attached_to(qctx, vm.id)
    assert volume is not None
    _sh(qctx, owner, vm, f"setsid -f python3 -c '{WRITER}' >/dev/null 2>&1 </dev/null", user="root")
    console = Path(vm.directory) / "console.log"
    deadline = time.monotonic() + 120
    acked: list[int] = []
    while time.monotonic() < deadline:
        acked = [int(n) for n in re.findall(rb"FSYNCED (\d+)\r?\n", console.read_bytes())]
        if len(acked) >= 40:
            break
        time.sleep(0.2)
    assert len(acked) >= 40, "the writer did not get going"
    pid = _qemu_pid(vm)
    os.kill(pid, signal.SIGKILL)  # mid-write: the loop never pauses
    assert process_gone(pid, 10)
    acked = [int(n) for n in re.findall(rb"FSYNCED (\d+)\r?\n", console.read_bytes())]
    last = max(acked)

    replacement, created = vm_manager.ensure_cli_vm(qctx, owner)
    assert created and replacement.id != vm.id
    assert workspaces.attached_to(qctx, replacement.id).id == volume.id  # type: ignore[union-attr]
    report = _home_report(qctx, replacement)
    assert report["state"] == "mounted" and report["fsck"] in (0, 1)  # e2fsck -p: clean or journal replayed
    records = _sh(qctx, owner, replacement, "cat ~/fsynced.log").splitlines()
    numbers = [int(line.split()[1]) for line in records if line.startswith("record ") and len(line) == 216]
    assert numbers[: last + 1] == list(range(last + 1)), f"fsynced records lost (last acknowledged {last})"

    # Shut the replacement down and check the volume on the host: a full check finds nothing.
    vm_manager.stop_vm(qctx, owner, replacement.id)
    check = subprocess.run(["e2fsck", "-fn", volume.location], capture_output=True, text=True, check=False)
    assert check.returncode == 0, check.stdout + check.stderr


@SQLITE
def test_export_and_import_of_a_home(qctx: AppContext, owner: Principal) -> None:
    import io
    import tarfile

    from remotecli.services import workspace_transfer

    vm, _ = vm_manager.ensure_cli_vm(qctx, owner)
    _sh(qctx, owner, vm, "mkdir -p ~/work && echo exported > ~/work/a.txt && chmod 640 ~/work/a.txt && sync")
    archive = b"".join(workspace_transfer.export_home(qctx, owner.name))
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        member = tar.getmember("./work/a.txt")
        assert (member.uid, member.mode & 0o777) == (1000, 0o640)
        extracted = tar.extractfile(member)
        assert extracted is not None and extracted.read() == b"exported\n"
        assert "./.bashrc" in tar.getnames()

    payload = io.BytesIO()
    with tarfile.open(fileobj=payload, mode="w") as tar:
        data = b"imported\n" * 1000
        info = tarfile.TarInfo("./restored/b.txt")
        info.size, info.uid, info.gid, info.mode = len(data), 1000, 1000, 0o600
        tar.addfile(info, io.BytesIO(data))
    payload.seek(0)
    size = workspace_transfer.import_home(qctx, owner.name, payload)
    assert size == len(payload.getvalue())
    assert _sh(qctx, owner, vm, "stat -c '%a %U' ~/restored/b.txt && wc -c < ~/restored/b.txt") == "600 cli\n9000\n"
    assert _sh(qctx, owner, vm, "cat ~/work/a.txt") == "exported\n"  # files not in the archive stay
    assert _sh(qctx, owner, vm, "ls /var/tmp | grep -c remotecli- || true") == "0\n"  # staging removed


def _qemu_pids_with(path: str) -> list[int]:
    """QEMU processes on this host whose command line names ``path`` (a volume file)."""
    return qemu_pids_naming(path)


@BOTH_DATABASES
def test_home_survives_a_controller_sigkill_and_restart(db_url: str) -> None:
    from remotecli.background.reconciler import Reconciler
    from remotecli.services import users as users_service
    from tests.integration.conftest import close_and_clean, qemu_settings, require_images

    settings = qemu_settings(db_url)
    require_images(settings, "cli")
    first = AppContext.create(settings)
    live = first
    try:
        user = users_service.create_user(first.db, "itest")
        owner = Principal(user.id, user.name, False)
        vm, created = vm_manager.ensure_cli_vm(first, owner)
        assert created
        _sh(first, owner, vm, "echo 'before the kill' > ~/notes.txt && sync ~/notes.txt")  # written, fsynced
        pid = _qemu_pid(vm)
        # The controller is SIGKILLed: nothing of it runs any more and nothing is cleaned up (its
        # VMs keep running); only its database connections go, as the kernel would close them.
        first.db.dispose()

        second = AppContext.create(settings)  # a new controller on the same database and data dir
        live = second
        volume = workspaces.attached_to(second, vm.id)
        assert volume is not None
        report = Reconciler(second, orphan_grace_s=0).run_once()
        # Its first pass adopts the running VM: nothing failed, stopped, destroyed or detached.
        assert [f for f in report.findings if f.id in (vm.id, volume.id)] == [], report.findings
        assert report.errors == 0
        assert vm_manager.get_vm(second, owner, vm.id).status == "running"
        assert os.path.exists(f"/proc/{pid}")
        again, created = vm_manager.ensure_cli_vm(second, owner)
        assert not created and again.id == vm.id
        assert _sh(second, owner, again, "cat ~/notes.txt") == "before the kill\n"
        _assert_home_is_the_volume(second, owner, again)
        assert [(v.id, v.attached_vm_id) for v in workspaces.list_volumes(second)] == [(volume.id, vm.id)]
        assert _qemu_pids_with(volume.location) == [pid]  # one QEMU has the volume: not attached twice
    finally:
        close_and_clean(live)


@SQLITE
def test_home_survives_an_idle_stop_and_start(db_url: str) -> None:
    from remotecli.background.reconciler import Reconciler
    from remotecli.db.models import Event
    from remotecli.services import users as users_service
    from tests.integration.conftest import close_and_clean, qemu_settings, require_images

    settings = qemu_settings(db_url, cli_vm_idle_stop_s=2.0)
    require_images(settings, "cli")
    ctx = AppContext.create(settings)
    try:
        user = users_service.create_user(ctx.db, "itest")
        owner = Principal(user.id, user.name, False)
        vm, _ = vm_manager.ensure_cli_vm(ctx, owner)
        _sh(ctx, owner, vm, "echo 'idle work' > ~/notes.txt && sync")
        pid = _qemu_pid(vm)
        time.sleep(settings.cli_vm_idle_stop_s + 1)  # unused for longer than cli_vm_idle_stop_s
        report = Reconciler(ctx).run_once()  # its idle-stop step (the loop's pass, called directly)
        assert [(f.kind, f.result) for f in report.findings if f.id == vm.id] == [("idle_stop", "done")], (
            report.findings)
        stopped = vm_manager.get_vm(ctx, owner, vm.id)
        assert stopped.status == "stopped" and (stopped.status_reason or "").startswith(vm_manager.IDLE_STOP_REASON)
        assert process_gone(pid, 10)  # its memory is freed
        volume = workspaces.attached_to(ctx, vm.id)  # the stopped VM keeps its home
        assert volume is not None and volume.status == "attached"
        with ctx.db.read() as session:
            from sqlalchemy import select

            assert session.scalar(select(Event.id).where(Event.kind == "vm.idle_stopped",
                                                         Event.vm_id == vm.id)) is not None

        # The next exec starts it again, with the same home, unmounted cleanly by the graceful stop.
        assert _sh(ctx, owner, stopped, "cat ~/notes.txt") == "idle work\n"
        restarted = vm_manager.get_vm(ctx, owner, vm.id)
        assert restarted.status == "running"
        _assert_home_is_the_volume(ctx, owner, restarted)
        assert _home_report(ctx, restarted)["fsck"] == 0
        # ensure (the terminal page and sign-ins) takes the same VM: no new one, the same volume.
        again, created = vm_manager.ensure_cli_vm(ctx, owner)
        assert not created and again.id == vm.id and again.status == "running"
        assert workspaces.attached_to(ctx, vm.id).id == volume.id  # type: ignore[union-attr]
        assert _qemu_pids_with(volume.location) == [_qemu_pid(again)]
    finally:
        close_and_clean(ctx)
