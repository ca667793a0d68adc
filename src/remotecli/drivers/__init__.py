"""VM drivers behind one interface (``drivers.base.VmDriver``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from remotecli.errors import DriverUnavailable

if TYPE_CHECKING:
    from remotecli.config import Settings
    from remotecli.drivers.base import VmDriver


def get_driver(settings: Settings) -> VmDriver:
    """The driver named by ``settings.driver``.

    ``auto`` picks QEMU (KVM when the host can run a guest with it, TCG otherwise). Firecracker is
    used only when chosen explicitly: it has been exercised against a fake of its API only (see
    docs/decisions/0004-firecracker-driver.md), so it is not picked silently.
    """
    name = settings.driver
    if name == "fake":
        from remotecli.drivers.fake import FakeDriver

        return FakeDriver()
    if name == "firecracker":
        try:
            from remotecli.drivers.firecracker.driver import FirecrackerDriver
        except ImportError:  # pragma: no cover - the package is part of the product
            raise DriverUnavailable("The Firecracker driver is not installed.") from None
        return FirecrackerDriver(settings)
    if name == "incus":
        from remotecli.drivers.incus.driver import IncusDriver

        return IncusDriver(settings)
    from remotecli.drivers.qemu.driver import QemuDriver

    return QemuDriver(settings)
