"""The agent protocol's static guarantees: host/guest constants agree, the guest package is
standard-library only, the config disk format, framing and endpoint parsing."""

from __future__ import annotations

import ast
import json
import sys
from pathlib import Path

import pytest

import remotecli.agent.guest as guest_package
from remotecli.agent import protocol
from remotecli.agent.client import AgentClient
from remotecli.agent.guest import config as guest_config
from remotecli.agent.guest import oauth as guest_oauth
from remotecli.agent.guest import wire

GUEST_DIR = Path(guest_package.__file__).parent

DUPLICATED = [
    "API_PREFIX",
    "UPGRADE_PTY",
    "UPGRADE_TCP",
    "FRAME_HEADER_SIZE",
    "FRAME_DATA",
    "FRAME_RESIZE",
    "FRAME_EXIT",
    "MAX_FRAME_PAYLOAD",
    "MAX_OUTPUT_BYTES",
    "MAX_FILE_BYTES",
    "MAX_BODY_BYTES",
    "MAX_EXEC_TIMEOUT_S",
    "PATH_OAUTH_FLOWS",
    "PATH_OAUTH_BROWSER",
    "PATH_CREDENTIAL_HEALTH",
    "CLI_ENV_FILE",
]
# guest/wire.py's OAUTH_STATUS_<NAME> mirror protocol.OAuthFlowStatus.<NAME>.
OAUTH_STATUSES = [f"OAUTH_STATUS_{status.name}" for status in protocol.OAuthFlowStatus]


@pytest.mark.parametrize("name", DUPLICATED)
def test_guest_and_host_constants_match(name: str) -> None:
    assert getattr(wire, name) == getattr(protocol, name)


def test_every_guest_wire_constant_is_mirrored() -> None:
    public = {name for name in vars(wire) if name.isupper()}
    assert public == set(DUPLICATED) | set(OAUTH_STATUSES)


@pytest.mark.parametrize("status", list(protocol.OAuthFlowStatus))
def test_guest_and_host_oauth_statuses_match(status: protocol.OAuthFlowStatus) -> None:
    assert getattr(wire, f"OAUTH_STATUS_{status.name}") == status.value


def test_guest_oauth_agent_uses_the_wire_constants() -> None:
    assert guest_oauth.FLOWS_PATH == protocol.PATH_OAUTH_FLOWS
    assert guest_oauth.BROWSER_PATH == protocol.PATH_OAUTH_BROWSER
    assert {status.value for status in protocol.OAUTH_TERMINAL} == guest_oauth.TERMINAL
    statuses = {guest_oauth.STARTING, guest_oauth.PAGE_LOADING, guest_oauth.AWAITING_USER, guest_oauth.EXCHANGING,
                guest_oauth.COMPLETED, guest_oauth.DENIED, guest_oauth.FAILED}
    assert statuses == {status.value for status in protocol.OAuthFlowStatus}


def test_config_disk_model_matches_the_guest_reader(tmp_path: Path) -> None:
    fields = protocol.ConfigDisk.model_fields
    assert {name for name, field in fields.items() if field.is_required()} == set(guest_config.REQUIRED_KEYS)
    disk = protocol.ConfigDisk(vm_id="vm-1", vm_type="cli", agent_secret="s" * 40, agent_port=7000,
                               hostname="vm-1", cli_user="cli", agent_vsock_port=7000)
    assert "s" * 40 not in repr(disk)
    path = tmp_path / protocol.CONFIG_DISK_FILE
    path.write_bytes(disk.encode())
    assert path.stat().st_size == protocol.CONFIG_DISK_SIZE
    config = guest_config.load_config(str(path), wait_s=0)
    assert (config.vm_id, config.agent_port, config.agent_vsock_port) == ("vm-1", 7000, 7000)
    without_vsock = protocol.ConfigDisk(**{**disk.model_dump(), "agent_vsock_port": None}).encode()
    assert b"agent_vsock_port" not in without_vsock


def test_oauth_flow_spec_sends_what_was_set() -> None:
    spec = protocol.OAuthFlowSpec(
        flow_id="flow-1", authorize_url="https://idp.test/authorize", token_url="https://idp.test/token",
        client_id="cli", client_secret=None, redirect=protocol.OAuthRedirect(host="localhost", port=0),
        browser=protocol.OAuthBrowser(display=":0"),
    )
    assert spec.to_wire() == {
        "flow_id": "flow-1", "authorize_url": "https://idp.test/authorize", "token_url": "https://idp.test/token",
        "client_id": "cli", "client_secret": None, "redirect": {"host": "localhost", "port": 0},
        "browser": {"display": ":0"},
    }
    as_nobody = spec.with_browser(user="nobody", display=":7")
    assert as_nobody.to_wire()["browser"] == {"display": ":7", "user": "nobody"}
    assert spec.browser.user == "browser" and "user" not in spec.to_wire()["browser"]
    assert "secret" not in repr(spec.model_copy(update={"client_secret": "secret"}))


def test_oauth_flow_state_keeps_the_token_response_and_hides_it() -> None:
    state = protocol.OAuthFlowState.model_validate({
        "flow_id": "f", "status": "completed", "error_code": None, "refused_callbacks": 0, "unknown": 1,
        "result": {"access_token": "at-secret", "refresh_token": "rt", "expires_in": 3600, "obtained_at": 12.5},
    })
    assert state.status is protocol.OAuthFlowStatus.COMPLETED and state.status.terminal
    assert state.result is not None and state.result.obtained_at == 12.5
    assert state.result.as_dict() == {"access_token": "at-secret", "refresh_token": "rt", "expires_in": 3600,
                                      "obtained_at": 12.5}
    assert "at-secret" not in repr(state)
    started = protocol.OAuthFlowState.model_validate({"flow_id": "f", "status": "page_loading",
                                                      "redirect_uri": "http://localhost:1/cb"})
    assert started.result is None and not started.status.terminal


def test_guest_package_is_stdlib_only() -> None:
    files = sorted(GUEST_DIR.glob("*.py"))
    assert {path.name for path in files} >= {"__init__.py", "__main__.py"}
    for path in files:
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                roots = [alias.name.split(".")[0] for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level > 0:
                    continue  # relative import inside the package
                roots = [(node.module or "").split(".")[0]]
            else:
                continue
            for root in roots:
                assert root in sys.stdlib_module_names, f"{path.name} imports {root!r}"


def _write_config(path: Path, doc: object, pad: int = 4096) -> Path:
    path.write_bytes(json.dumps(doc).encode().ljust(pad, b"\0"))
    return path


def _doc(**overrides: object) -> dict[str, object]:
    doc: dict[str, object] = {
        "vm_id": "vm-1",
        "vm_type": "cli",
        "agent_secret": "s" * 40,
        "agent_port": 7000,
        "hostname": "vm-1",
        "cli_user": "cli",
    }
    doc.update(overrides)
    return doc


def test_config_reads_until_the_first_nul(tmp_path: Path) -> None:
    path = _write_config(tmp_path / "config.img", _doc())
    with path.open("ab") as handle:
        handle.write(b"garbage after the padding")
    config = guest_config.load_config(str(path), wait_s=0)
    assert (config.vm_id, config.agent_port, config.cli_user) == ("vm-1", 7000, "cli")
    assert "s" * 40 not in repr(config)


@pytest.mark.parametrize(
    "doc",
    [
        _doc(agent_secret="short"),
        _doc(agent_port="7000"),
        {key: value for key, value in _doc().items() if key != "vm_id"},
        ["not", "an", "object"],
    ],
)
def test_config_rejects_bad_documents_without_echoing_the_secret(tmp_path: Path, doc: object) -> None:
    path = _write_config(tmp_path / "config.img", doc)
    with pytest.raises(guest_config.ConfigError) as caught:
        guest_config.load_config(str(path), wait_s=0)
    assert "s" * 40 not in str(caught.value)


def test_config_missing_file(tmp_path: Path) -> None:
    with pytest.raises(guest_config.ConfigError):
        guest_config.load_config(str(tmp_path / "absent"), wait_s=0)


def test_frame_round_trip() -> None:
    frame = protocol.encode_frame(protocol.FRAME_DATA, b"hello")
    assert len(frame) == protocol.FRAME_HEADER_SIZE + 5
    assert protocol.decode_frame_header(frame[: protocol.FRAME_HEADER_SIZE]) == (protocol.FRAME_DATA, 5)
    resize = protocol.encode_resize(120, 40)
    kind, length = protocol.decode_frame_header(resize[:5])
    assert kind == protocol.FRAME_RESIZE
    assert json.loads(resize[5 : 5 + length]) == {"cols": 120, "rows": 40}
    with pytest.raises(ValueError):
        protocol.encode_frame(protocol.FRAME_DATA, b"x" * (protocol.MAX_FRAME_PAYLOAD + 1))


@pytest.mark.parametrize("endpoint", ["tcp://127.0.0.1:7000", "unix:///run/agent.sock", "http://127.0.0.1:1"])
def test_client_accepts_endpoints(endpoint: str) -> None:
    with AgentClient(endpoint, "secret-" * 5) as client:
        assert client.endpoint == endpoint
        assert "secret-" not in repr(client)


@pytest.mark.parametrize("endpoint", ["127.0.0.1:7000", "tcp://127.0.0.1", "ftp://x:1", "unix://relative"])
def test_client_rejects_bad_endpoints(endpoint: str) -> None:
    with pytest.raises(ValueError) as caught:
        AgentClient(endpoint, "secret-" * 5)
    assert "secret-" not in str(caught.value)


def test_config_optional_vsock_port(tmp_path: Path) -> None:
    path = _write_config(tmp_path / "config.img", _doc(agent_vsock_port=7000))
    assert guest_config.load_config(str(path), wait_s=0).agent_vsock_port == 7000
    path = _write_config(tmp_path / "config.img", _doc())
    assert guest_config.load_config(str(path), wait_s=0).agent_vsock_port is None
    path = _write_config(tmp_path / "config.img", _doc(agent_vsock_port=0))
    with pytest.raises(guest_config.ConfigError):
        guest_config.load_config(str(path), wait_s=0)


def test_client_parses_firecracker_vsock_endpoint() -> None:
    with AgentClient("unix+vsock:///var/lib/remotecli/vms/x/vsock.sock?port=7000", "s" * 40) as client:
        assert "s" * 40 not in repr(client)
    with pytest.raises(ValueError):
        AgentClient("unix+vsock:///var/lib/vsock.sock", "s" * 40)
