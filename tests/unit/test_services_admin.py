"""services/admin.py and services/dashboard.py: what the admin page and the dashboard read
(fake driver, both databases). The pages themselves are tested in test_web.py."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from remotecli.background.gc import GarbageCollector
from remotecli.context import AppContext
from remotecli.errors import AuthSessionNotFound, PermissionDenied, VmNotFound
from remotecli.services import admin, auth_flow, dashboard, vm_manager
from remotecli.services import users as users_service
from remotecli.services.users import Principal


def _user(ctx: AppContext, name: str, is_admin: bool = False) -> Principal:
    user = users_service.create_user(ctx.db, name, is_admin=is_admin)
    return Principal(user.id, user.name, is_admin)


@dataclass
class _Finding:
    kind: str
    id: str
    owner: str | None
    why: str
    action: str


@dataclass
class _Report:
    findings: list[_Finding] = field(default_factory=list)


class _Collector:
    def __init__(self, report: _Report | None) -> None:
        self.report = report
        self.dry_runs: list[bool] = []

    def run_once(self, *, dry_run: bool = False) -> _Report:
        self.dry_runs.append(dry_run)
        if self.report is None:
            raise RuntimeError("collector mid-change")
        return self.report


def test_admin_reads_are_for_admins_only(ctx: AppContext) -> None:
    root, alice = _user(ctx, "root", is_admin=True), _user(ctx, "alice")
    vm = vm_manager.create_vm(ctx, alice, "cli")
    auth = auth_flow.start_session(ctx, alice, "codex")
    collector = _Collector(_Report())
    for call in (lambda who: admin.overview(ctx, who, admin.AdminFilters()),
                 lambda who: admin.vm_detail(ctx, who, vm.id),
                 lambda who: admin.session_detail(ctx, who, auth.id),
                 lambda who: admin.gc_preview(ctx, who, collector)):
        with pytest.raises(PermissionDenied):
            call(alice)
        call(root)
    assert collector.dry_runs == [True]  # the refused call never reached the collector


def test_admin_overview_filters_and_hides_password_hashes(ctx: AppContext) -> None:
    root, alice, bob = _user(ctx, "root", is_admin=True), _user(ctx, "alice"), _user(ctx, "bob")
    users_service.set_password(ctx.db, "alice", "correct horse battery")
    cli = vm_manager.create_vm(ctx, alice, "cli")
    browser = vm_manager.create_vm(ctx, bob, "browser")
    vm_manager.destroy_vm(ctx, None, browser.id)
    everything = admin.overview(ctx, root, admin.AdminFilters())
    assert [v.id for v in everything.vms] == [cli.id]  # removed VMs only when asked for
    assert {v.id for v in admin.overview(ctx, root, admin.AdminFilters(ended="1")).vms} == {cli.id, browser.id}
    assert [v.id for v in admin.overview(ctx, root, admin.AdminFilters(user="bob", ended="1")).vms] == [browser.id]
    assert admin.overview(ctx, root, admin.AdminFilters(user="nobody")).vms == []
    summaries = {u.name: u for u in everything.users}
    assert summaries["alice"].has_password and not summaries["bob"].has_password
    assert not hasattr(summaries["alice"], "password_hash")
    assert everything.names[alice.user_id] == "alice"


def test_details_answer_not_found_for_unknown_ids(ctx: AppContext) -> None:
    root = _user(ctx, "root", is_admin=True)
    with pytest.raises(VmNotFound):
        admin.vm_detail(ctx, root, "vm-nope")
    with pytest.raises(AuthSessionNotFound):
        admin.session_detail(ctx, root, "nope")


def test_gc_preview_names_owners_and_reports_a_failing_dry_run(ctx: AppContext) -> None:
    root, alice = _user(ctx, "root", is_admin=True), _user(ctx, "alice")
    report = _Report([_Finding("failed_vm", "vm-1", alice.user_id, "failed (boom) and past its TTL", "destroy"),
                      _Finding("tickets", "3 tickets", None, "expired", "purge")])
    preview = admin.gc_preview(ctx, root, _Collector(report))
    assert preview.error == "" and preview.rows is not None
    assert [(r.kind, r.owner, r.action) for r in preview.rows] == [
        ("Failed VM past its TTL", "alice", "destroy"), ("Websocket tickets", "", "purge")]
    failed = admin.gc_preview(ctx, root, _Collector(None))
    assert failed.rows is None and "RuntimeError" in failed.error
    # The real collector's dry run changes nothing and finds nothing on an empty controller.
    assert admin.gc_preview(ctx, root, GarbageCollector(ctx)).rows == []


def test_dashboard_reads_only_the_users_own_things(ctx: AppContext) -> None:
    root, alice = _user(ctx, "root", is_admin=True), _user(ctx, "alice")
    vm_manager.create_vm(ctx, alice, "cli")
    auth = auth_flow.start_session(ctx, alice, "codex")
    mine = dashboard.overview(ctx, alice)
    assert len(mine.vms) == 1 and mine.hidden_vms == 0
    codex = next(s for s in mine.sign_ins if s.provider == "codex")
    assert codex.live_session_id == auth.id and codex.completed is None
    # An admin's dashboard is their own too: none of alice's VMs or sign-ins.
    assert dashboard.overview(ctx, root).vms == []
    with pytest.raises(AuthSessionNotFound):
        dashboard.sign_in_state(ctx, root, auth.id)
    with pytest.raises(AuthSessionNotFound):
        dashboard.sign_in_page(ctx, root, auth.id)
    state = dashboard.sign_in_state(ctx, alice, auth.id)
    assert state.session.id == auth.id and state.session.vnc_url is None and not state.terminal
