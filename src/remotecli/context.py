"""The controller's shared objects, built once per process and handed to services.

Besides the settings, the database, the VM driver and the secret box, a context carries:

* ``providers``: the sign-in provider profiles (``remotecli.profiles.ProviderRegistry``, a
  ``Mapping[str, ProviderProfile]``), loaded once, at first use, from the built-in profiles, the
  config file and ``REMOTECLI_PROVIDER_*``; ``ctx.providers.reload()`` reads them again;
* ``notifier``: in-process wake-ups (``remotecli.notifier``): a service that creates work for a
  background loop (a new sign-in session) notifies its topic, the loop subscribed to it wakes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from remotecli.agent.protocol import GuestAgent
from remotecli.config import Settings
from remotecli.crypto import SecretBox
from remotecli.db.models import Vm
from remotecli.db.session import Database
from remotecli.drivers.base import VmDriver
from remotecli.errors import AgentUnreachable
from remotecli.notifier import Notifier
from remotecli.profiles import ProviderRegistry


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
    notifier: Notifier = field(default_factory=Notifier)
    providers: ProviderRegistry = field(init=False, repr=False)

    def __post_init__(self) -> None:
        # The registry reads nothing until a profile is first used.
        self.providers = ProviderRegistry(self.settings)

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
