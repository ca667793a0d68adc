"""VM drivers behind one interface (``drivers.base.VmDriver``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from remotecli.errors import DriverUnavailable

if TYPE_CHECKING:
    from remotecli.config import Settings
    from remotecli.drivers.base import VmDriver


def get_driver(settings: Settings) -> VmDriver:
    """The driver named by ``settings.driver``; ``auto`` picks Firecracker when it can run, else QEMU."""
    name = settings.driver
    if name == "fake":
        from remotecli.drivers.fake import FakeDriver

        return FakeDriver()
    if name in ("auto", "firecracker"):
        try:
            from remotecli.drivers.firecracker.driver import FirecrackerDriver
        except ImportError:  # pragma: no cover - the package is part of the product
            if name == "firecracker":
                raise DriverUnavailable("The Firecracker driver is not installed.") from None
        else:
            firecracker = FirecrackerDriver(settings)
            if name == "firecracker" or firecracker.availability().ok:
                return firecracker
    from remotecli.drivers.qemu.driver import QemuDriver

    return QemuDriver(settings)
