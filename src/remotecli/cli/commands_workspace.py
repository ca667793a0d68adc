"""``remotecli workspace``: users' home volumes (ADR 0011)."""

from __future__ import annotations

import sys
from typing import BinaryIO

import click

from remotecli.cli.common import app_context, fmt_time, handle_errors, print_json, print_table


@click.group()
def workspace() -> None:
    """Users' home volumes: list, export and import."""


@workspace.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
@handle_errors
def workspace_list(as_json: bool) -> None:
    """Every home volume with its status and the VM it is attached to."""
    from remotecli.services import workspaces

    with app_context() as ctx:
        rows = workspaces.list_volumes(ctx)
    items = [{"id": v.id, "user_id": v.user_id, "status": v.status, "status_reason": v.status_reason,
              "size_gib": round(v.size_bytes / 1024**3, 1), "attached_vm_id": v.attached_vm_id,
              "location": v.location, "created_at": v.created_at.isoformat()} for v in rows]
    if as_json:
        print_json(items)
        return
    print_table(["ID", "USER", "STATUS", "GIB", "VM", "CREATED"],
                [[v.id, v.user_id, v.status + (f" ({v.status_reason})" if v.status_reason else ""),
                  f"{v.size_bytes / 1024**3:.0f}", v.attached_vm_id or "-", fmt_time(v.created_at)] for v in rows])


@workspace.command("export")
@click.argument("user")
@handle_errors
def workspace_export(user: str) -> None:
    """Write USER's home as a tar archive to standard output: remotecli workspace export alice > home.tar"""
    from remotecli.services import workspace_transfer

    if sys.stdout.isatty():
        raise click.UsageError("standard output is a terminal; redirect it to a file (> home.tar)")
    with app_context() as ctx:
        for piece in workspace_transfer.export_home(ctx, user):
            sys.stdout.buffer.write(piece)
        sys.stdout.buffer.flush()


@workspace.command("import")
@click.argument("user")
@click.argument("archive", type=click.File("rb"), default="-")
@handle_errors
def workspace_import(user: str, archive: BinaryIO) -> None:
    """Unpack a tar archive (a file, or standard input) over USER's home; files of the same name are replaced."""
    from remotecli.services import workspace_transfer

    with app_context() as ctx:
        size = workspace_transfer.import_home(ctx, user, archive)
    click.echo(f"Unpacked {size} bytes into {user}'s home.", err=True)


def register(main: click.Group) -> None:
    main.add_command(workspace)
