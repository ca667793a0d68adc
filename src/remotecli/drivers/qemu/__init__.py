"""QEMU microvm driver (docs/decisions/0003-qemu-microvm.md)."""

from remotecli.drivers.qemu.driver import QemuDriver

__all__ = ["QemuDriver"]
