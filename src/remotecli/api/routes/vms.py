"""/api/v1/vms: thin routes over ``services.vm_manager``."""

from __future__ import annotations

from fastapi import APIRouter, Response, status

from remotecli.api.deps import Ctx, CurrentPrincipal
from remotecli.api.schemas import ErrorOut, VmCreateIn, VmEnsureIn, VmExecIn, VmExecOut, VmListOut, VmOut
from remotecli.services import vm_exec, vm_manager
from remotecli.services.vm_manager import VmView

router = APIRouter(prefix="/api/v1/vms", tags=["vms"])

ERRORS: dict[int | str, dict[str, object]] = {
    code: {"model": ErrorOut} for code in (400, 401, 403, 404, 409, 422, 429, 502, 503, 504)
}


def _out(vm: object) -> VmOut:
    return VmOut.of(VmView.of(vm))  # type: ignore[arg-type]


@router.get("", response_model=VmListOut, responses=ERRORS)
def list_vms(
    ctx: Ctx,
    principal: CurrentPrincipal,
    all: bool = False,
    vm_type: str | None = None,
    status: str | None = None,
) -> VmListOut:
    """My VMs, newest first (admins may pass ``all=true`` for everyone's)."""
    vms = vm_manager.list_vms(ctx, principal, all_users=all, vm_type=vm_type, status=status)
    return VmListOut(items=[_out(vm) for vm in vms])


@router.post("", response_model=VmOut, status_code=status.HTTP_201_CREATED, responses=ERRORS)
def create_vm(body: VmCreateIn, ctx: Ctx, principal: CurrentPrincipal) -> VmOut:
    """Create and boot a CLI VM; answers once its guest agent is ready (status ``running``).
    Browser VMs are started by sign-ins only: ``browser`` answers 403 ``browser_vm_not_allowed``."""
    vm = vm_manager.create_vm_for_user(ctx, principal, body.vm_type, vcpus=body.vcpus, memory_mib=body.memory_mib)
    return _out(vm)


@router.post("/ensure", response_model=VmOut, responses={**ERRORS, 201: {"model": VmOut}})
def ensure_vm(body: VmEnsureIn, ctx: Ctx, principal: CurrentPrincipal, response: Response) -> VmOut:
    """My live CLI VM, proven alive (200), or a new one (201)."""
    vm, created = vm_manager.ensure_cli_vm(ctx, principal)
    response.status_code = status.HTTP_201_CREATED if created else status.HTTP_200_OK
    return _out(vm)


@router.get("/{vm_id}", response_model=VmOut, responses=ERRORS)
def get_vm(vm_id: str, ctx: Ctx, principal: CurrentPrincipal) -> VmOut:
    return _out(vm_manager.get_vm(ctx, principal, vm_id))


@router.delete("/{vm_id}", response_model=VmOut, responses=ERRORS)
def destroy_vm(vm_id: str, ctx: Ctx, principal: CurrentPrincipal) -> VmOut:
    """Destroy the VM and everything it owns on the host (idempotent)."""
    return _out(vm_manager.destroy_vm(ctx, principal, vm_id))


@router.post("/{vm_id}/stop", response_model=VmOut, responses=ERRORS)
def stop_vm(vm_id: str, ctx: Ctx, principal: CurrentPrincipal) -> VmOut:
    return _out(vm_manager.stop_vm(ctx, principal, vm_id))


@router.post("/{vm_id}/start", response_model=VmOut, responses=ERRORS)
def start_vm(vm_id: str, ctx: Ctx, principal: CurrentPrincipal) -> VmOut:
    return _out(vm_manager.start_vm(ctx, principal, vm_id))


@router.post("/{vm_id}/pause", response_model=VmOut, responses=ERRORS)
def pause_vm(vm_id: str, ctx: Ctx, principal: CurrentPrincipal) -> VmOut:
    return _out(vm_manager.pause_vm(ctx, principal, vm_id))


@router.post("/{vm_id}/resume", response_model=VmOut, responses=ERRORS)
def resume_vm(vm_id: str, ctx: Ctx, principal: CurrentPrincipal) -> VmOut:
    return _out(vm_manager.resume_vm(ctx, principal, vm_id))


@router.post("/{vm_id}/rebuild", response_model=VmOut, responses=ERRORS)
def rebuild_vm(vm_id: str, ctx: Ctx, principal: CurrentPrincipal) -> VmOut:
    """Replace my CLI VM with a new one on the current image, keeping my home; answers with the new VM."""
    return _out(vm_manager.rebuild_cli_vm(ctx, principal, vm_id))


@router.post("/{vm_id}/exec", response_model=VmExecOut, responses=ERRORS)
def exec_in_vm(vm_id: str, body: VmExecIn, ctx: Ctx, principal: CurrentPrincipal) -> VmExecOut:
    """Run a command in my running VM and wait for it (no shell: ``argv`` as given). A timeout is
    not an error: ``timed_out`` is true and the command was killed."""
    result = vm_exec.exec_api(ctx, principal, vm_id, body.argv, timeout_s=body.timeout_s, user=body.user,
                                 cwd=body.cwd, env=body.env, stdin_b64=body.stdin_b64)
    return VmExecOut.model_validate(result)
