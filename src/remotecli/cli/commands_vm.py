"""``remotecli vm ...``: list, show, create, stop, start, pause, resume, destroy, exec."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from remotecli.background.common import host_spec
from remotecli.cli.common import age, app_context, fmt_time, handle_errors, print_json, print_table
from remotecli.db.models import Vm
from remotecli.domain.states import VM_STATUS_WORDS, VmStatus
from remotecli.services import users as users_service
from remotecli.services import vm_manager
from remotecli.services.users import Principal
from remotecli.services.vm_exec import exec_in_vm


def _vm_dict(vm: Vm) -> dict[str, object]:
    view = vm_manager.VmView.of(vm)
    return {key: value for key, value in view.__dict__.items()}


def _principal(ctx: object, user: str) -> Principal:
    owner = users_service.get_user_by_name(ctx.db, user)  # type: ignore[attr-defined]
    return Principal(user_id=owner.id, name=owner.name, is_admin=owner.is_admin)


@click.group()
def vm() -> None:
    """Inspect and operate VMs (as the operator: every user's VMs)."""


@vm.command("list")
@click.option("--user", default=None, help="Only this user's VMs.")
@click.option("--type", "vm_type", type=click.Choice(["cli", "browser"]), default=None)
@click.option("--status", default=None, type=click.Choice([s.value for s in VmStatus]))
@click.option("--live", is_flag=True, help="Hide failed and destroyed VMs.")
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
@handle_errors
def vm_list(user: str | None, vm_type: str | None, status: str | None, live: bool, as_json: bool) -> None:
    """List VMs, newest first."""
    with app_context() as ctx:
        principal = _principal(ctx, user) if user else None
        vms = vm_manager.list_vms(ctx, principal, include_ended=not live, vm_type=vm_type, status=status)
        names = {u.id: u.name for u in users_service.list_users(ctx.db)}
    if as_json:
        print_json([_vm_dict(v) for v in vms])
        return
    print_table(
        ["id", "user", "type", "status", "age", "cpu", "mem", "reason"],
        [[v.id, "pool" if v.user_id is None else names.get(v.user_id, v.user_id[:8]), v.vm_type, v.status,
          age(v.created_at), v.vcpus,
          f"{v.memory_mib}M", (v.status_reason or "").splitlines()[0][:60] if v.status_reason else ""] for v in vms],
    )


@vm.command("show")
@click.argument("vm_id")
@click.option("--console", is_flag=True, help="Print the guest console log.")
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
@handle_errors
def vm_show(vm_id: str, console: bool, as_json: bool) -> None:
    """Show one VM (and its console log with --console)."""
    with app_context() as ctx:
        row = vm_manager.get_vm(ctx, None, vm_id)
        text = ""
        if console:  # through the driver: the VM may live on another host
            log_text = ctx.driver.console_log(host_spec(ctx, row))
            text = log_text if log_text is not None else (
                f"(no console log: {Path(row.directory) / 'console.log'} does not exist)")
    if as_json:
        data = _vm_dict(row)
        if console:
            data["console"] = text
        print_json(data)
        return
    if console:
        click.echo(text, nl=False)
        return
    for key, value in _vm_dict(row).items():
        if key == "status":
            value = f"{value} ({VM_STATUS_WORDS[VmStatus(str(value))]})"
        if hasattr(value, "isoformat"):
            value = fmt_time(value)  # type: ignore[arg-type]
        click.echo(f"{key:14} {value if value is not None else '-'}")


@vm.command("create")
@click.option("--user", required=True, help="Owner of the new VM.")
@click.option("--type", "vm_type", default="cli", show_default=True, help="cli or browser")
@click.option("--vcpus", type=int, default=None, help="Virtual CPUs (default per type).")
@click.option("--memory", "memory_mib", type=int, default=None, help="Memory in MiB (default per type).")
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
@handle_errors
def vm_create(user: str, vm_type: str, vcpus: int | None, memory_mib: int | None, as_json: bool) -> None:
    """Create and boot a VM; returns once its guest agent answers."""
    with app_context() as ctx:
        principal = _principal(ctx, user)
        if not as_json:
            click.echo(f"Booting a {vm_type} VM for {user}…", err=True)
        row = vm_manager.create_vm(ctx, principal, vm_type, vcpus=vcpus, memory_mib=memory_mib)
    if as_json:
        print_json(_vm_dict(row))
    else:
        click.echo(row.id)


def _action(name: str, func: object, help_text: str) -> None:
    @vm.command(name, help=help_text)
    @click.argument("vm_id")
    @click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
    @handle_errors
    def command(vm_id: str, as_json: bool) -> None:
        with app_context() as ctx:
            row = func(ctx, None, vm_id)  # type: ignore[operator]
        if as_json:
            print_json(_vm_dict(row))
        else:
            click.echo(f"{row.id}: {row.status}")


_action("stop", vm_manager.stop_vm, "Shut the VM down, keeping its disk.")
_action("start", vm_manager.start_vm, "Boot a stopped VM again on its disk.")
_action("pause", vm_manager.pause_vm, "Freeze the VM's CPUs.")
_action("resume", vm_manager.resume_vm, "Unfreeze a paused VM.")
_action("destroy", vm_manager.destroy_vm, "Destroy the VM and everything it owns on the host.")
_action("rebuild", vm_manager.rebuild_cli_vm,
        "Replace a CLI VM with a new one on the current image, keeping the user's home (prints the new VM).")


@vm.command("exec", context_settings={"ignore_unknown_options": True})
@click.argument("vm_id")
@click.argument("argv", nargs=-1, required=True, type=click.UNPROCESSED)
@click.option("--timeout", type=float, default=60.0, show_default=True, help="Seconds before the command is killed.")
@click.option("--as-user", default=None, help="Run as this guest user (default root).")
@handle_errors
def vm_exec(vm_id: str, argv: tuple[str, ...], timeout: float, as_user: str | None) -> None:
    """Run a command in the guest: remotecli vm exec VM_ID -- uname -r"""
    with app_context() as ctx:
        result = exec_in_vm(ctx, None, vm_id, list(argv), timeout_s=timeout, user=as_user)
    sys.stdout.buffer.write(result.stdout)
    sys.stderr.buffer.write(result.stderr)
    if result.timed_out:
        click.secho(f"error: the command did not finish within {timeout:g} s and was killed", fg="red", err=True)
        sys.exit(124)
    sys.exit(result.exit_code)


def register(main: click.Group) -> None:
    main.add_command(vm)
