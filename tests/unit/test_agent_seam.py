"""The one seam to a guest agent: ``AppContext.agent`` -> ``VmDriver.agent_client``.

The base driver hands out the real ``AgentClient``; the fake driver overrides it with its
in-process agent; services and the context never name the fake driver.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import remotecli
from remotecli.agent.client import AgentClient
from remotecli.agent.protocol import OAuthFlowSpec, OAuthFlowStatus, OAuthRedirect
from remotecli.context import AppContext, vm_agent_aad
from remotecli.drivers.base import VmDriver
from remotecli.drivers.fake import FakeAgent, FakeDriver
from remotecli.errors import AgentUnreachable
from remotecli.services import users as users_service
from remotecli.services import vm_manager
from remotecli.services.users import Principal

PACKAGE = Path(remotecli.__file__).parent
FAKE_MENTION = re.compile(r"fake://|FakeDriver|FakeAgent|drivers\.fake|\.name\s*==\s*[\"']fake[\"']")


def test_no_production_module_outside_drivers_names_the_fake_driver() -> None:
    offenders = []
    for path in sorted([*PACKAGE.joinpath("services").rglob("*.py"), PACKAGE / "context.py",
                        *PACKAGE.joinpath("background").rglob("*.py"), *PACKAGE.joinpath("api").rglob("*.py"),
                        *PACKAGE.joinpath("web").rglob("*.py")]):
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if FAKE_MENTION.search(line):
                offenders.append(f"{path.relative_to(PACKAGE)}:{number}: {line.strip()}")
    assert not offenders, offenders


def test_the_base_driver_hands_out_the_real_client(fake_driver: FakeDriver) -> None:
    client = VmDriver.agent_client(fake_driver, "tcp://127.0.0.1:9", "s" * 40, timeout=2.5)
    try:
        assert isinstance(client, AgentClient)
        assert client.timeout == 2.5
    finally:
        client.close()


def test_the_context_asks_the_driver(ctx: AppContext, fake_driver: FakeDriver) -> None:
    user = users_service.create_user(ctx.db, "alice")
    vm = vm_manager.create_vm(ctx, Principal(user.id, user.name, False), "browser")
    assert ctx.agent_secret(vm) and ctx.box.decrypt_text(vm.agent_secret_enc, vm_agent_aad(vm.id))
    with ctx.agent(vm, timeout=1) as agent:
        assert isinstance(agent, FakeAgent)
        assert agent.health().vm_id == vm.id
        spec = OAuthFlowSpec(flow_id="flow-1", authorize_url="https://idp.test/a", token_url="https://idp.test/t",
                             client_id="c", redirect=OAuthRedirect())
        assert agent.oauth_start(spec).status is OAuthFlowStatus.PAGE_LOADING
        assert agent.oauth_status("flow-1").status is OAuthFlowStatus.AWAITING_USER
        fake_driver.login_outcome = ("complete", {"access_token": "at", "obtained_at": 1.5})
        state = agent.oauth_status("flow-1")
        assert state.status is OAuthFlowStatus.COMPLETED and state.result is not None
        assert state.result.as_dict() == {"access_token": "at", "obtained_at": 1.5}
        agent.oauth_cancel("flow-1")
    vm.endpoint = None
    with pytest.raises(AgentUnreachable):
        ctx.agent(vm)
