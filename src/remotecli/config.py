"""Settings: the one place the controller's configuration is read.

Every setting comes from a ``REMOTECLI_*`` environment variable or from an optional TOML config
file (``REMOTECLI_CONFIG_FILE``, default ``<data_dir>/config.toml``). Every path derives from
``data_dir``. Defaults that are secrets (the encryption key) are generated on first run in the data
directory with mode 0600, never hard-coded here.
"""

from __future__ import annotations

import ipaddress
import os
import tomllib
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict


def _default_data_dir() -> Path:
    xdg = os.environ.get("XDG_DATA_HOME")
    base = Path(xdg) if xdg else Path.home() / ".local" / "share"
    return base / "remotecli"


class _TomlFileSource(PydanticBaseSettingsSource):
    """Reads the optional config file; environment variables win over it."""

    def __init__(self, settings_cls: type[BaseSettings]) -> None:
        super().__init__(settings_cls)
        path_text = os.environ.get("REMOTECLI_CONFIG_FILE")
        if path_text:
            path = Path(path_text)
        else:
            data_dir = Path(os.environ.get("REMOTECLI_DATA_DIR") or _default_data_dir())
            path = data_dir / "config.toml"
        self._data: dict[str, Any] = {}
        if path.is_file():
            with path.open("rb") as handle:
                self._data = tomllib.load(handle)

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return self._data.get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return {key: value for key, value in self._data.items() if key in self.settings_cls.model_fields}


class Settings(BaseSettings):
    """All configuration of one controller process."""

    # Errors never echo the input: it may hold a secret (oidc_client_secret, metrics_token).
    model_config = SettingsConfigDict(env_prefix="REMOTECLI_", extra="ignore", hide_input_in_errors=True)

    data_dir: Path = Field(default_factory=_default_data_dir)
    database_url: str | None = Field(
        default=None, description="SQLAlchemy URL; default is a SQLite file in the data directory"
    )
    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=1, le=65535)
    public_url: str | None = Field(default=None, description="URL users reach the dashboard at")
    tls_cert: Path | None = Field(default=None, description="Serve HTTPS with this certificate (PEM)")
    tls_key: Path | None = Field(default=None, description="Private key for tls_cert (PEM)")
    trusted_proxies: str = Field(
        default="", description="Comma-separated proxy addresses whose X-Forwarded-* headers are honoured"
    )

    # Dashboard single sign-on through OpenID Connect (services/oidc.py, ADR 0008). Off while oidc_issuer is unset.
    oidc_issuer: str | None = Field(
        default=None, description="OpenID Connect issuer URL (https; http only on loopback); unset: no single sign-on"
    )
    oidc_client_id: str | None = Field(default=None, description="Client id registered at the identity provider")
    oidc_client_secret: SecretStr | None = Field(
        default=None, description="Client secret (never logged or shown); unset: a public client (PKCE only)"
    )
    oidc_scopes: str = Field(default="openid email profile", description="Scopes to ask for; must include openid")
    oidc_display_name: str = Field(default="single sign-on", description="Login button: 'Sign in with <this>'")
    oidc_auto_create_users: bool = Field(
        default=True, description="Create a user at the first sign-in of an unknown identity (else: 403)"
    )
    oidc_allowed_email_domains: str = Field(
        default="", description="Comma-separated; if set, new users need a verified email in one of these domains"
    )
    oidc_admin_emails: str = Field(
        default="", description="Comma-separated verified emails that get the admin role when they sign in"
    )
    oidc_http_timeout_s: float = Field(default=10.0, gt=0, description="Timeout of each call to the provider")

    shared_images_dir: Path | None = Field(
        default=None, description="Read guest images from here instead of <data_dir>/images (tests, shared hosts)"
    )
    driver: Literal["auto", "qemu", "firecracker", "fake", "incus"] = "auto"
    accel: Literal["auto", "kvm", "tcg"] = "auto"

    # The Incus driver (drivers/incus; docs/incus-operators-guide.md).
    incus_url: str = Field(
        default="unix:///var/lib/incus/unix.socket",
        description="The Incus API: https://HOST:8443 (mutual TLS) or unix:///PATH of a local member")
    incus_project: str = Field(default="remotecli", description="The Incus project that holds remotecli's instances")
    incus_client_cert: Path | None = Field(
        default=None, description="The controller's Incus client certificate; default <data_dir>/incus/client.crt, "
        "made on first use")
    incus_client_key: Path | None = Field(default=None, description="Its key; default <data_dir>/incus/client.key")
    incus_server_cert: Path | None = Field(
        default=None, description="The cluster's server certificate (PEM), pinned: the only one trusted over https")
    incus_instance_type: Literal["container", "virtual-machine"] = Field(
        default="container",
        description="container: QEMU (TCG) inside a container per VM; virtual-machine: KVM members")
    incus_runner_image: str = Field(default="remotecli-runner",
                                    description="Image alias of the container that runs a VM's QEMU (python3, QEMU)")
    incus_storage_pool: str = Field(default="default", description="Pool of the home volumes (custom volumes)")
    incus_member_images_dir: str | None = Field(
        default=None, description="Path on every member holding the guest images (mounted read-only); unset: the "
        "image files are pushed into each VM's container")
    incus_runner_disks: str = Field(
        default="", description="Extra read-only disks of the runner container, 'inside=member_path,...'")
    incus_runner_usr: str = Field(
        default="/usr", description="The /usr inside the runner container with python3, QEMU and mkfs.ext4 (e.g. a "
        "read-only disk of the member's own /usr)")
    incus_runner_loader: str = Field(
        default="", description="A command prefix that runs those binaries (e.g. the dynamic loader of that /usr "
        "with --library-path), empty: run them directly")
    incus_agent_ports: str = Field(default="21000-21999",
                                   description="Member ports that publish each VM's agent TLS port (proxy device)")
    incus_agent_address: str | None = Field(
        default=None, description="Address of the agent ports when Incus is not clustered (default 127.0.0.1)")
    incus_timeout_s: float = Field(default=30.0, gt=0, description="Timeout of each Incus API call")
    member_unreachable_grace_s: float = Field(
        default=120.0, ge=0, description="A VM on an unreachable Incus member is 'unknown' this long, then failed "
        "and replaced; the old instance is fenced when its member returns")

    # Guest confinement (drivers/qemu/confinement.py; docs/security.md, ADR 0007 and 0009).
    qemu_uid_range: str = Field(
        default="1900000000-1900065535",
        description="When the controller runs as root, each QEMU drops to a uid (and gid) of its own from this "
        "inclusive range 'FIRST-LAST' (CLI VMs the first half, Browser VMs the second); no account may use "
        "these ids. Empty keeps QEMU as the controller's user",
    )
    guest_network_isolation: Literal["auto", "on", "off"] = Field(
        default="auto",
        description="Refuse guests' connections to the host's own addresses (controller API, other VMs' agents) "
        "and to private networks with nftables rules on QEMU's uids; 'auto' enforces when root and nft are "
        "there, 'on' refuses to boot a VM without it",
    )
    guest_host_allowed_ports: list[int] = Field(
        default_factory=list,
        description="TCP ports on the host's loopback that guests may still reach (e.g. a local proxy or IdP)",
    )
    guest_blocked_networks: list[str] = Field(
        default_factory=lambda: ["169.254.0.0/16"],
        description="Further networks guests may not reach, even when an allowed network contains them",
    )
    guest_allowed_networks: list[str] = Field(
        default_factory=list,
        description="Private networks ('10.1.0.0/16') or network:port pairs ('10.1.2.3:443', '[fd00::/64]:22') "
        "every guest may reach again (an internal mirror); prefer the per-type settings",
    )
    guest_allowed_networks_cli: list[str] = Field(
        default_factory=list, description="Like guest_allowed_networks, for CLI VMs only (an internal git server)"
    )
    guest_allowed_networks_browser: list[str] = Field(
        default_factory=list,
        description="Like guest_allowed_networks, for Browser VMs only (they need nothing private: keep it empty)",
    )

    cli_vm_memory_mib: int = Field(default=2048, ge=128)
    cli_vm_vcpus: int = Field(default=2, ge=1)
    browser_vm_memory_mib: int = Field(default=1536, ge=128)
    browser_vm_vcpus: int = Field(default=2, ge=1)
    max_vm_memory_mib: int = Field(default=16384, ge=128)
    max_vm_vcpus: int = Field(default=8, ge=1)

    vm_boot_timeout_s: float = Field(default=120.0, gt=0)
    vm_stop_timeout_s: float = Field(default=20.0, gt=0)
    agent_request_timeout_s: float = Field(default=30.0, gt=0)

    auth_session_ttl_s: float = Field(default=900.0, gt=0, description="Sign-in sessions expire after this")
    auth_page_timeout_s: float = Field(default=240.0, gt=0, description="Browser VM boot + login page on screen")
    vnc_ticket_ttl_s: float = Field(default=120.0, gt=0)
    browser_pool_size: int = Field(
        default=1, ge=0, le=64,
        description="Browser VMs kept booted (Chromium on a blank page, OAuth agent waiting) for the next "
        "sign-ins; each serves one sign-in and is destroyed after it; 0 turns the warm pool off",
    )
    browser_pool_interval_s: float = Field(
        default=2.0, gt=0, description="Pause between the warm pool's passes (it is also woken after each claim)"
    )
    browser_snapshot: bool = Field(
        default=True,
        description="Keep a snapshot of a booted Browser VM (Chromium started, no secret) for each Browser image and "
        "QEMU version, built in the background, and restore new Browser VMs from it instead of a cold boot "
        "(drivers that can; any failed restore boots cold with a warning)",
    )
    browser_snapshot_retry_s: float = Field(
        default=600.0, gt=0, description="After a failed snapshot build, wait this long before building again"
    )
    browser_clipboard_out: bool = Field(
        default=False,
        description="Let text copied inside the Browser VM reach the user's clipboard through noVNC (pasting "
        "into the VM is always allowed)",
    )
    websocket_access_check_s: float = Field(
        default=15.0, gt=0, description="Open terminal and VNC websockets of a disabled user close within this"
    )
    cli_guest_user: str = "cli"
    cli_guest_home: str = "/home/cli"
    # Persistent workspaces (services/workspaces.py, ADR 0011).
    cli_vm_idle_stop_s: float = Field(
        default=3600.0, ge=0,
        description="A running CLI VM with no terminal, exec, ensure or sign-in for this long is stopped (its "
        "home kept; the next use starts it again); 0 turns idle stop off",
    )
    workspace_orphan_retention_s: float | None = Field(
        default=30 * 86400.0, ge=0,
        description="A home volume whose user was deleted (without --purge) is removed by gc after this (None: kept)",
    )
    workspace_size_gib: int = Field(
        default=20, ge=1, le=16384,
        description="Size of each user's home volume (a sparse ext4 file: only what is written takes space)",
    )
    browser_guest_user: str = "browser"
    browser_vnc_port: int = 5900
    run_background: bool = Field(default=True, description="Run the background loops in this process")
    auth_lease_s: float = Field(default=30.0, gt=0, description="A sign-in worker's lease; re-claimed after this")

    # Reconciler and garbage collector (background/reconciler.py, background/gc.py; ADR 0006).
    reconciler_interval_s: float = Field(default=10.0, gt=0, description="Pause between reconciler passes")
    reconciler_wedged_after_s: float = Field(
        default=300.0, gt=0, description="A VM held this long in creating/starting/stopping/destroying is wedged"
    )
    reconciler_destroy_retry_after_s: float = Field(
        default=30.0, ge=0, description="A VM in destroying this long gets driver.destroy retried"
    )
    reconciler_orphan_grace_s: float = Field(
        default=60.0, ge=0, description="Host VMs no row owns are removed after being seen this long"
    )
    reconciler_lease_s: float = Field(default=60.0, gt=0, description="Per-VM reconcile lease (several controllers)")
    reconciler_batch_size: int = Field(default=200, ge=1)
    reconciler_audit_events: bool = Field(
        default=False, description="Write an event for every VM inspection (tests of multi-controller leases)"
    )
    gc_interval_s: float = Field(default=60.0, gt=0)
    gc_failed_ttl_s: float = Field(default=1800.0, ge=0, description="failed VMs are removed after this")
    gc_destroyed_retention_s: float | None = Field(
        default=7 * 86400.0, ge=0, description="destroyed VM rows are deleted after this (None: kept forever)"
    )
    gc_ticket_retention_s: float = Field(default=300.0, ge=0, description="expired/used websocket tickets kept")
    metrics_token: str | None = Field(
        default=None, description="If set, /metrics needs 'Authorization: Bearer <token>' from non-loopback clients"
    )

    # Abuse limits: each refusal is a 429 or 413 with a stable code.
    max_request_body_bytes: int = Field(default=1_048_576, ge=1024)
    max_live_auth_sessions_per_user: int = Field(default=3, ge=1)
    max_vm_creations_per_user_per_minute: int = Field(default=10, ge=1)
    max_live_vms_per_user: int | None = Field(
        default=None, ge=1,
        description="VMs one user may have live (not failed, destroying or destroyed) at once; default: one CLI "
        "VM plus one Browser VM per sign-in (1 + max_live_auth_sessions_per_user)",
    )
    max_login_attempts_per_15min: int = Field(default=10, ge=1)
    max_concurrent_execs_per_user: int = Field(
        default=4, ge=1, description="Commands one user may have running at once through the API (vms/{id}/exec)"
    )

    # Capacity admission (services/capacity.py): live VMs' memory and vCPUs against the host's.
    host_memory_mib: int | None = Field(
        default=None, ge=0,
        description="Memory VMs may use in all; default: the host's total minus host_memory_reserve_mib",
    )
    host_memory_reserve_mib: int = Field(
        default=1024, ge=0, description="Memory kept for the host itself when host_memory_mib is not set"
    )
    host_vcpus: int | None = Field(
        default=None, ge=0, description="vCPUs VMs may have in all (before overcommit); default: the host's CPUs"
    )
    host_memory_overcommit: float = Field(
        default=1.0, gt=0, description="VM memory admitted per MiB of host_memory_mib (1.0: no overcommit)"
    )
    host_vcpu_overcommit: float = Field(
        default=8.0, gt=0, description="vCPUs admitted per host vCPU (guests mostly idle; 1.0: none)"
    )
    host_capacity_retry_after_s: int = Field(
        default=30, ge=1, description="Retry-After of a 503 host_at_capacity"
    )

    log_level: str = "INFO"
    log_to_stderr: bool = True

    @field_validator("data_dir")
    @classmethod
    def _absolute(cls, value: Path) -> Path:
        return value.expanduser().resolve()

    @field_validator("guest_host_allowed_ports")
    @classmethod
    def _ports_in_range(cls, value: list[int]) -> list[int]:
        bad = [port for port in value if not 1 <= port <= 65535]
        if bad:
            raise ValueError(f"ports must be 1-65535, got {bad}")
        return sorted(set(value))

    @field_validator("guest_blocked_networks")
    @classmethod
    def _networks(cls, value: list[str]) -> list[str]:
        networks = []
        for item in value:
            try:
                networks.append(str(ipaddress.ip_network(item.strip(), strict=False)))
            except ValueError as exc:
                raise ValueError(f"not an IPv4 or IPv6 network: {item!r}") from exc
        return networks

    @field_validator("guest_allowed_networks", "guest_allowed_networks_cli", "guest_allowed_networks_browser")
    @classmethod
    def _destinations(cls, value: list[str]) -> list[str]:
        return [str(parse_allowed_destination(item)) for item in value]

    @field_validator("qemu_uid_range")
    @classmethod
    def _uid_range(cls, value: str) -> str:
        text = value.strip()
        if not text:
            return ""
        first, sep, last = text.partition("-")
        try:
            low, high = int(first), int(last)
        except ValueError:
            raise ValueError(f"qemu_uid_range must be 'FIRST-LAST' (two uids), got {value!r}") from None
        if not sep or low < 1000 or high >= 2**32 - 1 or high - low < 1:
            raise ValueError("qemu_uid_range must be 'FIRST-LAST' with 1000 <= FIRST < LAST < 4294967295")
        return f"{low}-{high}"

    @property
    def qemu_uids(self) -> tuple[int, int] | None:
        """qemu_uid_range as (first, last), or None when it is empty."""
        if not self.qemu_uid_range:
            return None
        first, _, last = self.qemu_uid_range.partition("-")
        return int(first), int(last)

    @property
    def live_vms_limit(self) -> int:
        """max_live_vms_per_user, or its default: one CLI VM plus one Browser VM per live sign-in."""
        if self.max_live_vms_per_user is not None:
            return self.max_live_vms_per_user
        return 1 + self.max_live_auth_sessions_per_user

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, env_settings, _TomlFileSource(settings_cls))

    # Paths: all derived from data_dir.
    @property
    def vms_dir(self) -> Path:
        return self.data_dir / "vms"

    @property
    def images_dir(self) -> Path:
        return self.shared_images_dir or self.data_dir / "images"

    @property
    def incus_client_cert_path(self) -> Path:
        return self.incus_client_cert or self.data_dir / "incus" / "client.crt"

    @property
    def incus_client_key_path(self) -> Path:
        return self.incus_client_key or self.data_dir / "incus" / "client.key"

    @property
    def incus_agent_port_range(self) -> tuple[int, int]:
        low, _, high = self.incus_agent_ports.partition("-")
        return int(low), int(high or low)

    @property
    def volumes_dir(self) -> Path:
        return self.data_dir / "volumes"

    @property
    def logs_dir(self) -> Path:
        return self.data_dir / "logs"

    @property
    def key_file(self) -> Path:
        return self.data_dir / "secret.key"

    @cached_property
    def effective_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{self.data_dir / 'remotecli.db'}"

    def ensure_dirs(self) -> None:
        """Create the data directory tree (mode 0700: it holds keys and VM secrets)."""
        for path in (self.data_dir, self.vms_dir, self.volumes_dir, self.images_dir, self.logs_dir):
            path.mkdir(parents=True, exist_ok=True)
        os.chmod(self.data_dir, 0o700)
        os.chmod(self.vms_dir, 0o700)
        os.chmod(self.volumes_dir, 0o700)

    def vm_defaults(self, vm_type: str) -> tuple[int, int]:
        """(vcpus, memory_mib) for a VM type."""
        if vm_type == "browser":
            return self.browser_vm_vcpus, self.browser_vm_memory_mib
        return self.cli_vm_vcpus, self.cli_vm_memory_mib

    # Single sign-on (OpenID Connect): checked once, when the settings are read.
    @field_validator("oidc_issuer", "oidc_client_id")
    @classmethod
    def _blank_is_unset(cls, value: str | None) -> str | None:
        return value.strip() or None if value is not None else None

    @model_validator(mode="after")
    def _oidc_complete(self) -> Settings:
        if self.oidc_issuer is None:
            if self.oidc_client_id or self.oidc_client_secret:
                raise ValueError("REMOTECLI_OIDC_CLIENT_ID/_SECRET are set but REMOTECLI_OIDC_ISSUER is not; "
                                 "set the issuer URL to turn single sign-on on, or remove them")
            return self
        problem = oidc_issuer_problem(self.oidc_issuer)
        if problem:
            raise ValueError(f"REMOTECLI_OIDC_ISSUER: {problem}")
        if not self.oidc_client_id:
            raise ValueError("REMOTECLI_OIDC_ISSUER is set but REMOTECLI_OIDC_CLIENT_ID is not: set the client id "
                             "registered at the identity provider (and REMOTECLI_OIDC_CLIENT_SECRET)")
        if "openid" not in self.oidc_scopes.split():
            raise ValueError("REMOTECLI_OIDC_SCOPES must include 'openid'")
        return self

    @property
    def oidc_enabled(self) -> bool:
        return self.oidc_issuer is not None


def _is_loopback_host(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def oidc_issuer_problem(issuer: str) -> str | None:
    """Why ``issuer`` cannot be an OpenID Connect issuer (None if it can): an absolute https URL
    without query or fragment; plain http only for a loopback host (tests, a local IdP)."""
    from urllib.parse import urlsplit

    parts = urlsplit(issuer)
    if parts.scheme not in ("https", "http") or not parts.hostname:
        return f"{issuer!r} is not an absolute https:// URL"
    if parts.query or parts.fragment:
        return "an issuer URL has no query or fragment"
    if parts.scheme == "http" and not _is_loopback_host(parts.hostname):
        return "the identity provider must be reached over https (plain http only on a loopback address)"
    return None


@dataclass(frozen=True)
class AllowedDestination:
    """One entry of guest_allowed_networks*: a network, and a port (TCP and UDP) or None for all."""

    network: ipaddress.IPv4Network | ipaddress.IPv6Network
    port: int | None = None

    def __str__(self) -> str:
        if self.port is None:
            return str(self.network)
        if self.network.version == 6:
            return f"[{self.network}]:{self.port}"
        return f"{self.network}:{self.port}"


def parse_allowed_destination(text: str) -> AllowedDestination:
    """'10.1.0.0/16', '10.1.2.3', '10.1.2.3:443', '10.1.0.0/16:22', 'fd00::/64', '[fd00::1]:443'.
    Addresses only: a name would be resolved by someone the guest may influence (DNS)."""
    item = text.strip()
    port: int | None = None
    network_text = item
    if item.startswith("["):
        network_text, sep, rest = item[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise ValueError(f"not a network or network:port: {text!r}")
        port_text = rest[1:] if rest else None
    elif item.count(":") == 1:
        network_text, _, port_text = item.partition(":")
    else:
        port_text = None
    if port_text is not None:
        if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
            raise ValueError(f"not a port (1-65535) in {text!r}")
        port = int(port_text)
    try:
        network = ipaddress.ip_network(network_text, strict=False)
    except ValueError:
        raise ValueError(f"not a network or network:port (addresses only, no names): {text!r}") from None
    return AllowedDestination(network, port)
