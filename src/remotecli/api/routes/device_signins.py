"""/api/v1/device-signins: a CLI's own device-code sign-in, run in the caller's CLI VM (thin routes
over ``services.device_signin``). The answers carry the one-time code and the link the user needs,
never a token (the CLI writes its own credentials in the guest)."""

from __future__ import annotations

import datetime as dt

from fastapi import APIRouter, status
from pydantic import BaseModel, ConfigDict, Field

from remotecli.api.deps import Ctx, CurrentPrincipal
from remotecli.api.schemas import ErrorOut
from remotecli.services import device_signin

router = APIRouter(prefix="/api/v1/device-signins", tags=["device-signins"])

ERRORS: dict[int | str, dict[str, object]] = {code: {"model": ErrorOut} for code in (400, 401, 404, 422, 429, 503)}


class DeviceSigninIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    provider: str = Field(description="a provider whose CLI offers device-code sign-in (today: codex)",
                          max_length=64)


class DeviceSigninOut(BaseModel):
    id: str
    provider: str
    status: str = Field(description="starting, awaiting_user, signed_in, failed or expired")
    message: str = Field(description="what is happening or what happened, in words")
    user_code: str | None = Field(None, description="the one-time code to enter at verification_uri")
    verification_uri: str | None = None
    error_code: str | None = None
    cli_vm_id: str | None = None
    created_at: dt.datetime
    expires_at: dt.datetime
    ended_at: dt.datetime | None = None

    @classmethod
    def of(cls, signin: device_signin.DeviceSignin) -> DeviceSigninOut:
        return cls(id=signin.id, provider=signin.provider, status=signin.status.value, message=signin.message,
                   user_code=signin.user_code, verification_uri=signin.verification_uri,
                   error_code=signin.error_code, cli_vm_id=signin.cli_vm_id, created_at=signin.created_at,
                   expires_at=signin.expires_at, ended_at=signin.ended_at)


class DeviceSigninList(BaseModel):
    items: list[DeviceSigninOut]


@router.post("", status_code=status.HTTP_201_CREATED, response_model=DeviceSigninOut, responses=ERRORS)
def start_device_signin(body: DeviceSigninIn, ctx: Ctx, principal: CurrentPrincipal) -> DeviceSigninOut:
    """Start the provider CLI's device-code sign-in in my CLI workspace; poll GET for the code."""
    return DeviceSigninOut.of(device_signin.start(ctx, principal, body.provider))


@router.get("", response_model=DeviceSigninList, responses=ERRORS)
def list_device_signins(ctx: Ctx, principal: CurrentPrincipal) -> DeviceSigninList:
    """My device sign-ins (this controller process), newest first."""
    return DeviceSigninList(items=[DeviceSigninOut.of(s) for s in device_signin.list_mine(ctx, principal)])


@router.get("/{signin_id}", response_model=DeviceSigninOut, responses=ERRORS)
def get_device_signin(signin_id: str, ctx: Ctx, principal: CurrentPrincipal) -> DeviceSigninOut:
    """One device sign-in: its status, and the code and link while it awaits the user."""
    return DeviceSigninOut.of(device_signin.get(ctx, principal, signin_id))
