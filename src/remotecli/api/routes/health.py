"""/healthz (process up) and /readyz (database, migrations, driver)."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse
from sqlalchemy import text

from remotecli.api.deps import Ctx
from remotecli.api.schemas import HealthOut

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=HealthOut)
def healthz() -> HealthOut:
    return HealthOut(status="ok")


@router.get("/readyz", response_model=HealthOut, responses={503: {"model": HealthOut}})
def readyz(ctx: Ctx) -> JSONResponse:
    checks: dict[str, str] = {}
    ready = True
    try:
        with ctx.db.engine.connect() as connection:
            connection.execute(text("SELECT 1"))
        checks["database"] = "ok"
        current, head = ctx.db.current_revision(), ctx.db.head_revision()
        checks["migrations"] = "ok" if current == head else f"at {current}, head is {head}"
        ready = ready and current == head
    except Exception as exc:
        checks["database"] = f"unreachable ({type(exc).__name__})"
        ready = False
    availability = ctx.driver.availability()
    checks["driver"] = f"{ctx.driver.name}: {'ok' if availability.ok else availability.detail}"
    ready = ready and availability.ok
    body = HealthOut(status="ok" if ready else "not_ready", checks=checks)
    return JSONResponse(body.model_dump(), status_code=200 if ready else 503)
