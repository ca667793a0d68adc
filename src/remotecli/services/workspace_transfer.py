"""Moving a home in and out as a tar archive: ``remotecli workspace export|import`` (ADR 0011).

The archive is made and unpacked inside the user's CLI VM (``ensure_cli_vm`` first: the home is
mounted there, and the guest's own tar keeps owners, modes and symlinks), staged in a file on the
VM's root disk (``/var/tmp``) and moved through the guest agent in 4 MiB pieces (``dd``), so a home
of any size crosses without holding it in memory. Import unpacks over the home: files in the
archive replace those of the same name, the others stay.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import BinaryIO

from remotecli.context import AppContext
from remotecli.db.models import Vm
from remotecli.errors import RemotecliError, VmError
from remotecli.logging import get_logger
from remotecli.services import vm_exec, vm_manager
from remotecli.services.transitions import record_event
from remotecli.services.users import Principal, get_user_by_name

MODULE = "workspaces"
log = get_logger(MODULE)
CHUNK = 4 * 1024 * 1024
_TIMEOUT_S = 600.0


def _principal(ctx: AppContext, name: str) -> Principal:
    user = get_user_by_name(ctx.db, name)  # UserNotFound, saying how to create one
    return Principal(user.id, user.name, user.is_admin)


def _run(ctx: AppContext, vm: Vm, argv: list[str], *, stdin: bytes | None = None, ok: tuple[int, ...] = (0,)) -> bytes:
    result = vm_exec.exec_in_vm(ctx, None, vm.id, argv, timeout_s=_TIMEOUT_S, user="root", stdin=stdin)
    if result.exit_code not in ok or result.timed_out or result.stdout_truncated:
        raise VmError("The workspace could not be read or written in its VM; nothing was changed.",
                      log_detail=f"{argv[0]}: exit {result.exit_code}: {result.stderr[-500:]!r}")
    return bytes(result.stdout)


def export_home(ctx: AppContext, user_name: str) -> Iterator[bytes]:
    """The user's home as a tar archive, in pieces (their CLI VM is started or made if needed)."""
    principal = _principal(ctx, user_name)
    vm, _ = vm_manager.ensure_cli_vm(ctx, principal)
    home = ctx.settings.cli_guest_home
    staged = f"/var/tmp/remotecli-export-{uuid.uuid4().hex}.tar"
    try:
        # tar exits 1 when a file changed while it was read (the archive is still whole).
        _run(ctx, vm, ["tar", "-C", home, "--numeric-owner", "-cpf", staged, "."], ok=(0, 1))
        size = int(_run(ctx, vm, ["stat", "-c", "%s", staged]).strip() or b"0")
        sent = 0
        for index in range((size + CHUNK - 1) // CHUNK):
            piece = _run(ctx, vm, ["dd", f"if={staged}", f"bs={CHUNK}", f"skip={index}", "count=1",
                                   "iflag=fullblock", "status=none"])
            sent += len(piece)
            yield piece
        if sent != size:
            raise VmError(log_detail=f"export of {user_name}: read {sent} of {size} bytes")
        with ctx.db.transaction() as session:
            record_event(session, module=MODULE, kind="workspace.exported", user_id=principal.user_id,
                         vm_id=vm.id, message=f"Home exported as a tar archive ({size} bytes)",
                         details={"bytes": size})
    finally:
        try:
            _run(ctx, vm, ["rm", "-f", staged])
        except RemotecliError:
            log.warning("could not remove the staged export", extra={"vm_id": vm.id})


def import_home(ctx: AppContext, user_name: str, source: BinaryIO) -> int:
    """Unpack a tar archive over the user's home; returns its size in bytes."""
    principal = _principal(ctx, user_name)
    vm, _ = vm_manager.ensure_cli_vm(ctx, principal)
    home = ctx.settings.cli_guest_home
    staged = f"/var/tmp/remotecli-import-{uuid.uuid4().hex}.tar"
    size = 0
    try:
        _run(ctx, vm, ["truncate", "-s", "0", staged])
        while piece := source.read(CHUNK):
            _run(ctx, vm, ["dd", f"of={staged}", "oflag=append", "conv=notrunc", "status=none"], stdin=piece)
            size += len(piece)
        _run(ctx, vm, ["tar", "-C", home, "--numeric-owner", "-xpf", staged])
        with ctx.db.transaction() as session:
            record_event(session, module=MODULE, kind="workspace.imported", user_id=principal.user_id,
                         vm_id=vm.id, message=f"Tar archive ({size} bytes) unpacked over the home",
                         details={"bytes": size})
    finally:
        try:
            _run(ctx, vm, ["rm", "-f", staged])
        except RemotecliError:
            log.warning("could not remove the staged import", extra={"vm_id": vm.id})
    return size
