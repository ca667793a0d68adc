"""The controller's shared objects, built once per process and handed to services."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from remotecli.config import Settings
from remotecli.crypto import SecretBox
from remotecli.db.models import Vm
from remotecli.db.session import Database
from remotecli.drivers.base import VmDriver
from remotecli.services.guest import agent_for, vm_agent_aad


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

    def agent(self, vm: Vm, timeout: float | None = None) -> Any:
        """A guest-agent client for ``vm`` (see ``services.guest.GuestAgent``)."""
        return agent_for(
            self.driver,
            vm.endpoint,
            self.agent_secret(vm),
            timeout if timeout is not None else self.settings.agent_request_timeout_s,
        )

    def close(self) -> None:
        self.db.dispose()
