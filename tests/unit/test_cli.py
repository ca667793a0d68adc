"""The remotecli command: exit codes, messages in words, --json."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from remotecli.cli.main import main


@pytest.fixture
def run(tmp_path: Path, db_url: str, monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    monkeypatch.setenv("REMOTECLI_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("REMOTECLI_DATABASE_URL", db_url)
    monkeypatch.setenv("REMOTECLI_DRIVER", "fake")
    runner = CliRunner()

    def invoke(*args: str, code: int = 0) -> str:
        result = runner.invoke(main, list(args), catch_exceptions=False)
        assert result.exit_code == code, (args, result.output)
        return result.output

    return invoke


def test_users_tokens_and_vms(run) -> None:  # type: ignore[no-untyped-def]
    assert "Created user alice" in run("users", "create", "alice")
    token = run("tokens", "create", "alice").splitlines()[0]
    assert token.startswith("rcli_")
    out = run("users", "create", "alice", code=1)
    assert "already exists" in out and "already_exists" in out
    assert "lower-case" in run("users", "create", "Not Valid!", code=2)
    vm_id = run("vm", "create", "--user", "alice", "--type", "browser").strip().splitlines()[-1]
    assert vm_id.startswith("vm-")
    listing = json.loads(run("vm", "list", "--json"))
    assert [v["id"] for v in listing] == [vm_id] and listing[0]["status"] == "running"
    assert "agent_secret" not in json.dumps(listing)
    assert "running (Running)" in run("vm", "show", vm_id)
    assert "fake: booted" in run("vm", "show", vm_id, "--console")
    assert "unknown_vm_type" in run("vm", "create", "--user", "alice", "--type", "gpu", code=2)
    assert "No such VM" in run("vm", "show", "vm-nope", code=1)
    assert "No user named" in run("vm", "create", "--user", "nobody", code=1)


def test_doctor_reports_checks(run) -> None:  # type: ignore[no-untyped-def]
    checks = json.loads(run("doctor", "--json"))
    names = {c["check"]: c["ok"] for c in checks}
    assert names["database"] and names["migrations"] and names["driver fake"]


def test_help_explains() -> None:
    result = CliRunner().invoke(main, ["--help"])
    assert result.exit_code == 0
    for command in ("up", "serve", "doctor", "images", "users", "tokens", "vm"):
        assert command in result.output
    vm_help = CliRunner().invoke(main, ["vm", "--help"]).output
    for command in ("list", "show", "create", "stop", "start", "pause", "resume", "destroy", "exec"):
        assert command in vm_help


def test_tokens_list_and_revoke(run, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    run("users", "create", "alice")
    token = run("tokens", "create", "alice", "--name", "laptop").splitlines()[0]
    listing = json.loads(run("tokens", "list", "--json"))
    assert len(listing) == 1 and listing[0]["name"] == "laptop" and listing[0]["revoked_at"] is None
    assert token not in json.dumps(listing)  # only a prefix is ever shown
    out = run("tokens", "revoke", listing[0]["id"][:8])
    assert "Revoked" in out
    assert json.loads(run("tokens", "list", "--json"))[0]["revoked_at"] is not None
    assert "No API token" in run("tokens", "revoke", "nope", code=1)


def test_keys_rotate_keeps_every_secret_readable(run, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from remotecli.config import Settings
    from remotecli.context import AppContext
    from remotecli.services import vm_manager

    run("users", "create", "alice")
    vm_id = run("vm", "create", "--user", "alice", "--type", "browser").strip().splitlines()[-1]
    settings = Settings()
    key_before = settings.key_file.read_bytes()
    ctx = AppContext.create(settings)
    secret_before = ctx.agent_secret(vm_manager.get_vm(ctx, None, vm_id))
    ctx.close()
    assert "re-encrypted 1 agent secret" in run("keys", "rotate")
    assert settings.key_file.read_bytes() != key_before
    assert settings.key_file.stat().st_mode & 0o777 == 0o600
    ctx = AppContext.create(Settings())
    try:
        assert ctx.agent_secret(vm_manager.get_vm(ctx, None, vm_id)) == secret_before
    finally:
        ctx.close()


def test_up_first_run_prints_a_dashboard_login_once(run, tmp_path: Path,  # type: ignore[no-untyped-def]
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    import re

    from remotecli.cli import commands_server
    from remotecli.config import Settings
    from remotecli.context import AppContext
    from remotecli.services import users as users_service

    served: list[int] = []
    monkeypatch.setattr(commands_server, "_serve", lambda ctx, host, port: served.append(port))
    out = run("up", "--skip-images", "--port", "18111")
    match = re.search(r"first dashboard login \(shown once\): user admin, password (\S+)", out)
    assert match and served == [18111], out
    password = match.group(1)
    assert len(password) >= 16 and "rcli_" in out  # the API token too
    ctx = AppContext.create(Settings())
    try:
        assert users_service.verify_password(ctx.db, "admin", password).is_admin
        log_files = list(ctx.settings.logs_dir.glob("*.log"))
        assert all(password not in f.read_text() for f in log_files)
    finally:
        ctx.close()
    again = run("up", "--skip-images", "--port", "18111")
    assert "first dashboard login" not in again and password not in again
