"""Image recipes as data: what goes into the kernel/initramfs and each VM type's root filesystem.

Everything a build depends on is described here (or in ``images/files/``, or in the guest agent's
source); the hashes in :mod:`remotecli.images.hashing` are computed from these values, so changing
a package list, the Debian suite or an init script produces a new image directory and a rebuild.
Bump :data:`BUILDER_VERSION` when the *build procedure* changes in a way that changes the output.
"""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass
from typing import Any

# Part of every hash: bump when the builder's procedure changes its output.
BUILDER_VERSION = 1

DEBIAN_SUITE = "trixie"
DEBIAN_MIRROR = "http://deb.debian.org/debian"


@dataclass(frozen=True)
class User:
    name: str
    uid: int
    home: str
    shell: str = "/bin/bash"
    groups: tuple[str, ...] = ()


@dataclass(frozen=True)
class KernelRecipe:
    """Debian's cloud kernel plus a busybox initramfs that loads the virtio modules."""

    suite: str = DEBIAN_SUITE
    mirror: str = DEBIAN_MIRROR
    # Extracted (not installed) with ``mmdebstrap --variant=extract``.
    packages: tuple[str, ...] = ("linux-image-cloud-amd64", "busybox-static")
    # Loaded by the initramfs /init, dependencies first (resolved from each module's modinfo).
    # Everything else the guest needs (ext4, virtio core, virtio_pci, the 8250 serial console,
    # virtio_console) is built into Debian's cloud kernel.
    # button + evdev: QMP system_powerdown reaches the guest as an ACPI power-button key press,
    # which /sbin/remotecli-init turns into a clean shutdown.
    modules: tuple[str, ...] = ("virtio_mmio", "virtio_blk", "virtio_net", "virtio_rng", "button", "evdev")
    init_file: str = "initramfs-init"

    def as_dict(self) -> dict[str, Any]:
        return {
            "suite": self.suite,
            "mirror": self.mirror,
            "packages": list(self.packages),
            "modules": list(self.modules),
            "init_file": self.init_file,
        }


@dataclass(frozen=True)
class ImageRecipe:
    """One VM type's root filesystem.

    The *tree* (slow stage: ``mmdebstrap`` + host-side ``npm install``) depends only on
    ``suite``, ``mirror``, ``packages``, ``npm_packages``, ``users`` and ``customize``. The final
    ``rootfs.ext4`` also depends on the init script, the guest agent's sources and ``disk_size_mib``.
    """

    vm_type: str
    packages: tuple[str, ...]
    users: tuple[User, ...]
    npm_packages: tuple[str, ...] = ()
    # Extra mmdebstrap --customize-hook commands; "$1" is the root directory.
    customize: tuple[str, ...] = ()
    suite: str = DEBIAN_SUITE
    mirror: str = DEBIAN_MIRROR
    variant: str = "minbase"
    # Size of the ext4 filesystem (sparse file): the guest's free space is this minus the content.
    disk_size_mib: int = 8192
    init_file: str = "remotecli-init"
    hostname: str = ""

    def tree_dict(self) -> dict[str, Any]:
        """The part of the recipe the slow stage depends on."""
        return {
            "vm_type": self.vm_type,
            "suite": self.suite,
            "mirror": self.mirror,
            "variant": self.variant,
            "packages": sorted(self.packages),
            "npm_packages": sorted(self.npm_packages),
            "users": [
                {"name": u.name, "uid": u.uid, "home": u.home, "shell": u.shell, "groups": list(u.groups)}
                for u in self.users
            ],
            "customize": list(self.customize),
        }

    def as_dict(self) -> dict[str, Any]:
        data = self.tree_dict()
        data.update(
            {
                "disk_size_mib": self.disk_size_mib,
                "init_file": self.init_file,
                "hostname": self.default_hostname,
            }
        )
        return data

    @property
    def default_hostname(self) -> str:
        return self.hostname or f"remotecli-{self.vm_type}"

    @property
    def primary_user(self) -> User:
        return self.users[0]


# Packages every image needs: the init script (it uses bash, coreutils, iproute2, util-linux),
# the guest agent (python3) and TLS roots.
_BASE_PACKAGES: tuple[str, ...] = (
    "bash",
    "coreutils",
    "util-linux",
    "procps",
    "iproute2",
    "ca-certificates",
    "python3",
    "passwd",
    "sudo",
    "less",
    "netbase",
)

# The CLIs of the cli image, pinned to exact versions: the provider profiles
# (provider_profiles.toml) are checked against the OAuth constants of these very
# releases (images/cli_constants.py). Moving a pin changes the recipe hash, so the image is rebuilt;
# `remotecli images outdated` lists newer releases and the differences they would bring.
CLI_VERSIONS: dict[str, str] = {
    "@anthropic-ai/claude-code": "2.1.332",
    "@openai/codex": "0.171.0",
    "@google/gemini-cli": "0.61.0",
}

CLI = ImageRecipe(
    vm_type="cli",
    packages=(
        *_BASE_PACKAGES,
        "git",
        "nodejs",
        "openssh-client",
        "curl",
        "ripgrep",
        "tzdata",
        # e2fsck: remotecli-init checks the home volume (journal recovery) before mounting it.
        "e2fsprogs",
    ),
    npm_packages=tuple(f"{name}@{version}" for name, version in CLI_VERSIONS.items()),
    users=(User(name="cli", uid=1000, home="/home/cli"),),
    # The guest is the user's sandbox: let the CLI user install what a task needs.
    customize=('echo \'cli ALL=(ALL) NOPASSWD:ALL\' > "$1/etc/sudoers.d/cli" && chmod 0440 "$1/etc/sudoers.d/cli"',),
    disk_size_mib=8192,
)

# Chromium's managed policies in the Browser VM (issue 13, ADR 0012): the VM is for logging in
# only, so nothing is downloaded, no file picker opens (no uploads), pages cannot use the File
# System Access API or read the clipboard, and nothing is saved or synced. The user's paste into
# the VM works (it is a key press); copying out is stopped at the VNC bridge (``api/ws_bridge``).
BROWSER_POLICIES: dict[str, Any] = {
    "DownloadRestrictions": 3,  # block all downloads
    "AllowFileSelectionDialogs": False,
    "PromptForDownloadLocation": False,
    "DefaultFileSystemReadGuardSetting": 2,
    "DefaultFileSystemWriteGuardSetting": 2,
    "DefaultClipboardSetting": 2,
    "PrintingEnabled": False,
    "PasswordManagerEnabled": False,
    "BrowserSignin": 0,
    "SyncDisabled": True,
    "ExtensionInstallBlocklist": ["*"],
}
BROWSER_POLICY_FILE = "/etc/chromium/policies/managed/remotecli.json"


def _chromium_policy_hook() -> str:
    """An mmdebstrap customize hook that writes :data:`BROWSER_POLICIES` (root-owned, 0644)."""
    body = shlex.quote(json.dumps(BROWSER_POLICIES, sort_keys=True))
    path = f'"$1{BROWSER_POLICY_FILE}"'
    return (f'mkdir -p "$1{BROWSER_POLICY_FILE.rsplit("/", 1)[0]}" && printf "%s\\n" {body} > {path}'
            f" && chmod 0644 {path}")


BROWSER = ImageRecipe(
    vm_type="browser",
    packages=(
        *_BASE_PACKAGES,
        "chromium",
        "xvfb",
        "x11vnc",
        "fonts-dejavu-core",
        "fonts-liberation",
        "fonts-noto-color-emoji",
        "xauth",
        "dbus",
    ),
    users=(User(name="browser", uid=1000, home="/home/browser"),),
    customize=(_chromium_policy_hook(),),
    disk_size_mib=6144,
)

KERNEL = KernelRecipe()

RECIPES: dict[str, ImageRecipe] = {CLI.vm_type: CLI, BROWSER.vm_type: BROWSER}
VM_TYPES: tuple[str, ...] = tuple(RECIPES)
