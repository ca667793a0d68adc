"""Schemathesis against /openapi.json with valid tokens: no 5xx and no schema violations.

Runs every operation of the REST API with generated inputs (fake driver, SQLite), as the owner
of a VM and a sign-in session so that path parameters can hit real objects too.
"""

from __future__ import annotations

import atexit
import shutil
import tempfile
from pathlib import Path

import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.specs.openapi.checks import positive_data_acceptance

from remotecli.app import create_app
from remotecli.config import Settings
from remotecli.context import AppContext
from remotecli.drivers.fake import FakeDriver
from remotecli.services import users as users_service
from remotecli.services import vm_manager
from remotecli.services.users import Principal

_state: dict[str, object] = {}
_data = Path(tempfile.mkdtemp(prefix="rcli-fuzz-"))
_ctx = AppContext.create(Settings(data_dir=_data / "data", database_url=f"sqlite:///{_data / 'fuzz.db'}",
                                  driver="fake", max_vm_creations_per_user_per_minute=10_000,
                                  max_vm_vcpus=64, max_vm_memory_mib=262144),
                         driver=FakeDriver())
_user = users_service.create_user(_ctx.db, "fuzz")
_state["token"] = users_service.create_token(_ctx.db, _user)[1]
_state["vm_id"] = vm_manager.create_vm(_ctx, Principal(_user.id, _user.name, False), "browser").id
atexit.register(lambda: (_ctx.close(), shutil.rmtree(_data, ignore_errors=True)))

schema = schemathesis.openapi.from_asgi("/openapi.json", create_app(_ctx, background=False))


@schema.parametrize()
@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
def test_api_conforms_to_its_schema(case: schemathesis.Case) -> None:
    case.headers = {**(case.headers or {}), "Authorization": f"Bearer {_state['token']}"}
    if case.path_parameters and "vm_id" in case.path_parameters and case.path_parameters["vm_id"] == "vm-known":
        case.path_parameters["vm_id"] = str(_state["vm_id"])
    excluded = []
    if case.method == "POST" and case.path == "/api/v1/auth-sessions":
        # Providers are configuration (any name matching a profile); an unknown one is a 422 by design.
        excluded.append(positive_data_acceptance)
    if case.method == "POST" and case.path == "/api/v1/device-signins":
        # As for auth-sessions: an unknown provider, or one whose CLI has no device sign-in, is a 422.
        excluded.append(positive_data_acceptance)
    if case.method == "POST" and case.path == "/api/v1/credentials/keys":
        # Keys are checked by their provider's shape (malformed_key, key_provider_mismatch): 422 by design.
        excluded.append(positive_data_acceptance)
    case.call_and_validate(excluded_checks=excluded)


def test_schema_lists_the_design_paths(tmp_path: Path) -> None:
    ctx = AppContext.create(Settings(data_dir=tmp_path / "d", database_url=f"sqlite:///{tmp_path / 'x.db'}",
                                     driver="fake"), driver=FakeDriver())
    try:
        paths = create_app(ctx, background=False).openapi()["paths"]
    finally:
        ctx.close()
    for path in ("/api/v1/vms", "/api/v1/vms/{vm_id}", "/api/v1/vms/ensure", "/api/v1/auth-sessions",
                 "/api/v1/auth-sessions/{session_id}", "/api/v1/auth-sessions/{session_id}/events",
                 "/api/v1/providers", "/healthz", "/readyz"):
        assert path in paths, path
