"""The guest's configuration: a JSON document on the config disk, terminated by a NUL byte."""

import json
import os
import time

MAX_CONFIG_BYTES = 1024 * 1024
REQUIRED_KEYS = ("vm_id", "vm_type", "agent_secret", "agent_port", "hostname", "cli_user")


class ConfigError(Exception):
    """The config disk is missing or malformed (the message never contains the secret)."""


class AgentConfig:
    __slots__ = ("agent_port", "agent_secret", "agent_vsock_port", "cli_user", "hostname", "vm_id", "vm_type")

    def __init__(self, vm_id, vm_type, agent_secret, agent_port, hostname, cli_user, agent_vsock_port=None):
        self.agent_vsock_port = agent_vsock_port
        self.vm_id = vm_id
        self.vm_type = vm_type
        self.agent_secret = agent_secret
        self.agent_port = agent_port
        self.hostname = hostname
        self.cli_user = cli_user

    def __repr__(self):
        return f"AgentConfig(vm_id={self.vm_id!r}, vm_type={self.vm_type!r}, agent_port={self.agent_port})"


def _read_until_nul(path):
    chunks = []
    total = 0
    with open(path, "rb", buffering=0) as handle:
        while total < MAX_CONFIG_BYTES:
            chunk = handle.read(65536)
            if not chunk:
                break
            nul = chunk.find(b"\0")
            if nul >= 0:
                chunks.append(chunk[:nul])
                return b"".join(chunks)
            chunks.append(chunk)
            total += len(chunk)
    data = b"".join(chunks)
    if total >= MAX_CONFIG_BYTES:
        raise ConfigError("config document is not NUL-terminated within 1 MiB")
    return data


def load_config(path, wait_s=30.0):
    """Read and validate the config; waits up to ``wait_s`` for the device to appear."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            raw = _read_until_nul(path)
            break
        except FileNotFoundError:
            if time.monotonic() >= deadline:
                raise ConfigError(f"config {path} does not exist") from None
            time.sleep(0.5)
        except OSError as exc:
            raise ConfigError(f"cannot read config {path}: {exc.strerror}") from None
    try:
        doc = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise ConfigError(f"config {path} is not a UTF-8 JSON document") from None
    return parse_config(doc)


def parse_config(doc):
    """Validate a config document (already parsed JSON) into an ``AgentConfig``."""
    if not isinstance(doc, dict):
        raise ConfigError("config document is not a JSON object")
    missing = [key for key in REQUIRED_KEYS if key not in doc]
    if missing:
        raise ConfigError(f"config document lacks {', '.join(missing)}")
    secret = doc["agent_secret"]
    if not isinstance(secret, str) or len(secret) < 16:
        raise ConfigError("agent_secret must be a string of at least 16 characters")
    port = doc["agent_port"]
    if not isinstance(port, int) or isinstance(port, bool) or not 0 <= port <= 65535:
        raise ConfigError("agent_port must be an integer port")
    vsock_port = doc.get("agent_vsock_port")  # optional: Firecracker guests are reached over vsock
    if vsock_port is not None and (
        not isinstance(vsock_port, int) or isinstance(vsock_port, bool) or not 1 <= vsock_port < 2**32
    ):
        raise ConfigError("agent_vsock_port must be a positive integer")
    for key in ("vm_id", "vm_type", "hostname", "cli_user"):
        if not isinstance(doc[key], str):
            raise ConfigError(f"{key} must be a string")
    return AgentConfig(
        vm_id=doc["vm_id"],
        vm_type=doc["vm_type"],
        agent_secret=secret,
        agent_port=port,
        hostname=doc["hostname"],
        cli_user=doc["cli_user"],
        agent_vsock_port=vsock_port,
    )


def boot_id():
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as handle:
            return handle.read().strip()
    except OSError:
        return os.urandom(16).hex()


def system_uptime():
    try:
        with open("/proc/uptime", encoding="ascii") as handle:
            return float(handle.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None
