"""How services reach a VM's guest agent (the real client, or the fake driver's in tests)."""

from __future__ import annotations

from typing import Any, Protocol

from remotecli.db.models import Vm
from remotecli.drivers.base import VmDriver
from remotecli.errors import AgentUnreachable


class GuestAgent(Protocol):
    """The subset of ``agent.client.AgentClient`` the services use."""

    def health(self) -> Any: ...

    def wait_ready(self, deadline_s: float, poll_interval: float = ...) -> Any: ...

    def close(self) -> None: ...


def agent_for(driver: VmDriver, endpoint: str | None, secret: str, timeout: float) -> Any:
    """A client for the agent at ``endpoint``. Raises ``AgentUnreachable`` when there is none yet."""
    if not endpoint:
        raise AgentUnreachable("The VM has no guest agent address yet; it is still starting.")
    if endpoint.startswith("fake://"):
        from remotecli.drivers.fake import FakeDriver

        assert isinstance(driver, FakeDriver)
        return driver.agent_client(endpoint, secret)
    from remotecli.agent.client import AgentClient

    return AgentClient(endpoint, secret, timeout=timeout)


def vm_agent_aad(vm: Vm | str) -> str:
    """Associated data binding an encrypted agent secret to its VM."""
    vm_id = vm if isinstance(vm, str) else vm.id
    return f"agent-secret:{vm_id}"
