"""The Firecracker VM driver (see docs/decisions/0004-firecracker-driver.md)."""

from __future__ import annotations

from remotecli.drivers.firecracker.api import FirecrackerApi, FirecrackerApiError, FirecrackerUnreachable
from remotecli.drivers.firecracker.driver import FirecrackerDriver, JailerConfig

__all__ = [
    "FirecrackerApi",
    "FirecrackerApiError",
    "FirecrackerDriver",
    "FirecrackerUnreachable",
    "JailerConfig",
]
