"""/api/v1/workspace: the caller's home volume and how full it is (thin route over services.workspaces)."""

from __future__ import annotations

from fastapi import APIRouter

from remotecli.api.deps import Ctx, CurrentPrincipal
from remotecli.api.schemas import ErrorOut, WorkspaceOut
from remotecli.services import workspaces

router = APIRouter(prefix="/api/v1/workspace", tags=["workspace"])

ERRORS: dict[int | str, dict[str, object]] = {code: {"model": ErrorOut} for code in (401, 404)}


@router.get("", response_model=WorkspaceOut, responses=ERRORS)
def get_workspace(ctx: Ctx, principal: CurrentPrincipal) -> WorkspaceOut:
    """My home volume: status, the VM it is attached to, and usage (used/total)."""
    view, usage = workspaces.my_workspace(ctx, principal.user_id)
    return WorkspaceOut(
        id=view.id, status=view.status, status_reason=view.status_reason, size_bytes=view.size_bytes,
        attached_vm_id=view.attached_vm_id, created_at=view.created_at, used_bytes=usage.used_bytes,
        total_bytes=usage.total_bytes, host_allocated_bytes=usage.host_allocated_bytes,
    )
