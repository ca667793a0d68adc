"""Content hashes that name image builds (see docs/decisions/0001).

* ``kernel_hash``: the kernel recipe + the initramfs ``/init`` script.
* ``tree_hash``: the package recipe of one VM type alone (Debian suite, packages, npm packages,
  users, customize hooks): names the cached slow-stage directory.
* ``image_hash``: ``tree_hash`` + the guest init script + every file of the guest agent package +
  the final-stage settings: names ``<vm_type>-<hash>/rootfs.ext4``.

Hashes are the first 16 hex digits of a SHA-256 over a canonical JSON document, stable across
runs, machines and Python versions.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from remotecli.images.recipes import BUILDER_VERSION, ImageRecipe, KernelRecipe

HASH_LEN = 16

FILES_DIR = Path(__file__).resolve().parent / "files"
AGENT_SOURCE_DIR = Path(__file__).resolve().parents[1] / "agent" / "guest"

_IGNORED_DIRS = {"__pycache__", ".mypy_cache", ".pytest_cache", ".ruff_cache"}
_IGNORED_SUFFIXES = (".pyc", ".pyo", ".swp", "~")


def _digest(document: Any) -> str:
    text = json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:HASH_LEN]


def file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def agent_source_files(agent_dir: Path = AGENT_SOURCE_DIR) -> list[Path]:
    """The files of the guest agent package that are copied into the image, sorted."""
    if not agent_dir.is_dir():
        return []
    found: list[Path] = []
    for path in agent_dir.rglob("*"):
        rel = path.relative_to(agent_dir)
        if any(part in _IGNORED_DIRS for part in rel.parts):
            continue
        if path.is_file() and not path.name.endswith(_IGNORED_SUFFIXES):
            found.append(path)
    return sorted(found, key=lambda p: p.relative_to(agent_dir).as_posix())


def agent_digest(agent_dir: Path = AGENT_SOURCE_DIR) -> str:
    entries = [[path.relative_to(agent_dir).as_posix(), file_digest(path)] for path in agent_source_files(agent_dir)]
    return _digest({"agent_files": entries})


def kernel_hash(recipe: KernelRecipe, files_dir: Path = FILES_DIR) -> str:
    return _digest(
        {
            "kind": "kernel",
            "builder": BUILDER_VERSION,
            "recipe": recipe.as_dict(),
            "init": file_digest(files_dir / recipe.init_file),
        }
    )


def tree_hash(recipe: ImageRecipe) -> str:
    return _digest({"kind": "tree", "builder": BUILDER_VERSION, "recipe": recipe.tree_dict()})


def image_hash(recipe: ImageRecipe, files_dir: Path = FILES_DIR, agent_dir: Path = AGENT_SOURCE_DIR) -> str:
    return _digest(
        {
            "kind": "rootfs",
            "builder": BUILDER_VERSION,
            "tree": tree_hash(recipe),
            "recipe": recipe.as_dict(),
            "init": file_digest(files_dir / recipe.init_file),
            "agent": agent_digest(agent_dir),
        }
    )
