"""Guest images: recipes, content hashes, the builder and the lookup the drivers use.

Public API (other code depends on these names):

* ``resolve(settings, vm_type) -> ImageRef | None``: the build for the current recipe.
* ``build(settings, vm_types, progress=None, force=False) -> list[BuildResult]``.
* ``status(settings) -> list[ImageStatus]`` for ``doctor``; ``prune(settings)``; ``missing_tools()``.

Layout and boot contract: docs/decisions/0001-guest-boot-contract.md.
"""

from remotecli.images.builder import (
    BuildResult,
    BuildToolMissing,
    ImageBuildFailed,
    ImageStatus,
    ProgressCallback,
    ProgressEvent,
    build,
    current_hashes,
    missing_tools,
    prune,
    require,
    resolve,
    status,
)
from remotecli.images.recipes import RECIPES, VM_TYPES

__all__ = [
    "RECIPES",
    "VM_TYPES",
    "BuildResult",
    "BuildToolMissing",
    "ImageBuildFailed",
    "ImageStatus",
    "ProgressCallback",
    "ProgressEvent",
    "build",
    "current_hashes",
    "missing_tools",
    "prune",
    "require",
    "resolve",
    "status",
]
