"""The test cluster itself: guard routes, 3 members ONLINE, a container placed on a member, a cut
member OFFLINE and back, incusd SIGKILLed with its container running on, evacuation by migration,
and a teardown that leaves nothing behind."""

from __future__ import annotations

import errno
import json
import os
import socket
import ssl
import time
import uuid
from collections.abc import Iterator

import httpx
import pytest

from tests.support import incus_cluster as ic

pytestmark = [pytest.mark.cluster, pytest.mark.slow]


def _name() -> str:
    return f"h-{uuid.uuid4().hex[:8]}"


def _instance(name: str) -> dict[str, object]:
    out = ic.ctl_incus("list", "--project", ic.PROJECT, "--format", "json", f"^{name}$").stdout
    found: list[dict[str, object]] = json.loads(out)
    assert len(found) == 1, found
    return found[0]


@pytest.fixture()
def container(incus_cluster: ic.ClientConfig, request: pytest.FixtureRequest) -> Iterator[str]:
    """A running busybox container in the remotecli project (on m2 if the test is parametrized so)."""
    name = _name()
    target = getattr(request, "param", None)
    args = ["launch", ic.IMAGE_ALIAS, name, "--project", ic.PROJECT]
    if target:
        args += ["--target", target]
    ic.ctl_incus(*args, timeout=300)
    yield name
    ic.ctl_incus("delete", "--force", name, "--project", ic.PROJECT, check=False, timeout=300)


def test_guard_routes_are_in_place_and_the_root_namespace_cannot_reach_members(
        incus_cluster: ic.ClientConfig) -> None:
    assert ic.missing_guard_routes() == []
    for prefix in ic.GUARD_ROUTES_V4:
        assert "unreachable" in ic._ip("-4", "route", "show", "exact", prefix).stdout
    # A connect from the root namespace fails locally at the route lookup: no packet is sent.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(2)
        err = sock.connect_ex((ic.MEMBER_ADDRESS["m1"], ic.HTTPS_PORT))
    assert err in (errno.EHOSTUNREACH, errno.ENETUNREACH), os.strerror(err)
    # Inside the test net nothing has a way out: no default route in any member or the controller.
    for ns in (ic.CTL_NS, *(ic.member_ns(m) for m in ic.MEMBERS)):
        routes = ic._ip("-n", ns, "route", "show").stdout
        assert "default" not in routes and routes.strip() == f"{ic.SUBNET} dev eth0 proto kernel scope link src " \
            + (ic.CTL_ADDRESS if ns == ic.CTL_NS else ic.MEMBER_ADDRESS[ns.rsplit("-", 1)[1]]), routes


def test_three_members_are_online_to_the_controller_over_mtls(incus_cluster: ic.ClientConfig) -> None:
    listed = json.loads(ic.ctl_incus("cluster", "list", "--format", "json").stdout)
    assert {m["server_name"]: m["status"].upper() for m in listed} == {m: "ONLINE" for m in ic.MEMBERS}
    # The same through the forwarder an in-process test uses: TLS end to end, our cert trusted.
    ctx = ssl.create_default_context(cafile=str(incus_cluster.server_cert))
    ctx.check_hostname = False
    ctx.load_cert_chain(str(incus_cluster.cert), str(incus_cluster.key))
    for member in ic.MEMBERS:
        transport = httpx.HTTPTransport(uds=str(ic.ctl_forward(member)), verify=ctx)
        with httpx.Client(transport=transport, base_url=f"https://{ic.MEMBER_ADDRESS[member]}:8443") as client:
            meta = client.get("/1.0").raise_for_status().json()["metadata"]
        assert meta["auth"] == "trusted"
        assert meta["environment"]["server_name"] == member


def test_a_container_launched_by_the_controller_lands_on_a_member(container: str) -> None:
    inst = _instance(container)
    assert inst["status"] == "Running"
    assert inst["location"] in ic.MEMBERS
    echoed = ic.ctl_incus("exec", container, "--project", ic.PROJECT, "--", "echo", "hello").stdout
    assert echoed.strip() == "hello"


def test_a_cut_member_goes_offline_and_comes_back(incus_cluster: ic.ClientConfig) -> None:
    started = time.monotonic()
    ic.cut_link("m3")
    try:
        ic.wait_members({"m3": "OFFLINE", "m1": "ONLINE", "m2": "ONLINE"}, timeout=90)
        offline_after = time.monotonic() - started
    finally:
        ic.restore_link("m3")
    ic.wait_members({m: "ONLINE" for m in ic.MEMBERS}, timeout=90)
    print(f"m3 OFFLINE {offline_after:.0f} s after the cut; ONLINE again "
          f"{time.monotonic() - started - offline_after:.0f} s after the restore")


@pytest.mark.parametrize("container", ["m2"], indirect=True)
def test_incusd_sigkill_keeps_the_container_running(container: str) -> None:
    inst = _instance(container)
    assert inst["location"] == "m2"
    state = inst["state"]
    assert isinstance(state, dict)
    init_pid = ic.host_pid("m2", int(state["pid"]))
    assert init_pid is not None
    killed = ic.kill_incusd("m2")
    assert ic.incusd_pid("m2") is None
    assert os.path.exists(f"/proc/{init_pid}"), "the container died with incusd"
    restarted = ic.start_incusd("m2")
    assert restarted != killed
    ic.wait_members({m: "ONLINE" for m in ic.MEMBERS}, timeout=90)
    after = _instance(container)
    assert after["status"] == "Running"
    assert isinstance(after["state"], dict)
    assert ic.host_pid("m2", int(after["state"]["pid"])) == init_pid


@pytest.mark.parametrize("container", ["m2"], indirect=True)
def test_evacuate_migrate_moves_the_container_off_the_member(container: str) -> None:
    assert _instance(container)["location"] == "m2"
    ic.evacuate("m2")
    try:
        moved = _instance(container)
        assert moved["location"] in ("m1", "m3")
        assert moved["status"] == "Running"
        assert ic.cluster_members()["m2"] == "EVACUATED"
    finally:
        ic.restore("m2")
    ic.wait_members({m: "ONLINE" for m in ic.MEMBERS}, timeout=90)


def test_teardown_leaves_nothing_and_the_cluster_comes_back(incus_cluster: ic.ClientConfig,
                                                            incus_cluster_owned: bool) -> None:
    """Last in this module: down, check nothing is left (the cached tree stays), up again for the
    tests that follow in the session."""
    if not incus_cluster_owned:
        pytest.skip("the cluster was up before this session (someone else's): not taking it down")
    ic.down()
    assert ic.leftovers() == []
    assert ic.tree_dir().exists()
    started = time.monotonic()
    ic.up(log=False)
    print(f"up again with the cached tree in {time.monotonic() - started:.0f} s")
    assert ic.cluster_members() == {m: "ONLINE" for m in ic.MEMBERS}
