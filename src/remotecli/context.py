"""The controller's shared objects, built once per process and handed to services."""

from __future__ import annotations

from dataclasses import dataclass

from remotecli.agent.protocol import GuestAgent
from remotecli.config import Settings
from remotecli.crypto import SecretBox
from remotecli.db.models import Vm
from remotecli.db.session import Database
from remotecli.drivers.base import VmDriver
from remotecli.errors import AgentUnreachable


def vm_agent_aad(vm: Vm | str) -> str:
    """Associated data binding an encrypted agent secret to its VM."""
    vm_id = vm if isinstance(vm, str) else vm.id
    return f"agent-secret:{vm_id}"


@dataclass
class AppContext:
    settings: Settings
    db: Database
    driver: VmDriver
    box: SecretBox

    @classmethod
    def create(cls, settings: Settings, *, driver: VmDriver | None = None, migrate: bool = True) -> AppContext:
        from remotecli.drivers import get_driver

        settings.ensure_dirs()
        db = Database(settings.effective_database_url)
        if migrate:
            db.migrate()
        return cls(
            settings=settings,
            db=db,
            driver=driver or get_driver(settings),
            box=SecretBox.from_key_file(settings.key_file),
        )

    def agent_secret(self, vm: Vm) -> str:
        return self.box.decrypt_text(vm.agent_secret_enc, vm_agent_aad(vm))

    def agent(self, vm: Vm, timeout: float | None = None) -> GuestAgent:
        """A client of ``vm``'s guest agent, from the driver (``VmDriver.agent_client``); close it.

        ``timeout`` bounds each request (default ``agent_request_timeout_s``). Raises
        ``AgentUnreachable`` while the VM has no agent address yet.
        """
        if not vm.endpoint:
            raise AgentUnreachable("The VM has no guest agent address yet; it is still starting.")
        return self.driver.agent_client(
            vm.endpoint,
            self.agent_secret(vm),
            timeout=timeout if timeout is not None else self.settings.agent_request_timeout_s,
        )

    def close(self) -> None:
        self.db.dispose()
