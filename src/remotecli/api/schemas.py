"""Request and response bodies of the REST API (no secrets in any response model)."""

from __future__ import annotations

import datetime as dt
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from remotecli.domain.states import VM_STATUS_WORDS, VmStatus
from remotecli.services.vm_manager import VmView


class ErrorOut(BaseModel):
    code: str = Field(description="Stable machine-readable error code")
    message: str = Field(description="What happened and what to do, in words")


class VmCreateIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    vm_type: str = Field(description="'cli' or 'browser'")
    vcpus: int | None = Field(default=None, description="Virtual CPUs (default per VM type)")
    memory_mib: int | None = Field(default=None, description="Guest memory in MiB (default per VM type)")


class VmEnsureIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    vm_type: Literal["cli"] = "cli"


class VmOut(BaseModel):
    id: str
    user_id: str
    vm_type: str
    status: str
    status_words: str
    status_reason: str | None
    driver: str
    vcpus: int
    memory_mib: int
    generation: int
    created_at: dt.datetime
    updated_at: dt.datetime
    last_seen_at: dt.datetime | None
    expires_at: dt.datetime | None

    @classmethod
    def of(cls, view: VmView) -> VmOut:
        return cls(
            id=view.id,
            user_id=view.user_id,
            vm_type=view.vm_type,
            status=view.status,
            status_words=VM_STATUS_WORDS[VmStatus(view.status)],
            status_reason=view.status_reason,
            driver=view.driver,
            vcpus=view.vcpus,
            memory_mib=view.memory_mib,
            generation=view.generation,
            created_at=view.created_at,
            updated_at=view.updated_at,
            last_seen_at=view.last_seen_at,
            expires_at=view.expires_at,
        )


class VmListOut(BaseModel):
    items: list[VmOut]


class HealthOut(BaseModel):
    status: str
    checks: dict[str, str] = Field(default_factory=dict)
