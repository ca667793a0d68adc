"""``remotecli gc``: show (and remove) what the reconciler and the garbage collector would remove."""

from __future__ import annotations

import click

from remotecli.background.common import Finding
from remotecli.cli.common import app_context, handle_errors, print_json, print_table
from remotecli.services import users as users_service


def _rows(findings: list[Finding], names: dict[str, str]) -> list[list[str]]:
    return [[f.kind, f.id, names.get(f.owner or "", (f.owner or "-")[:8]), f.why, f.action, f.result]
            for f in findings]


@click.command("gc")
@click.option("--dry-run", is_flag=True, help="Only show what would be removed; change nothing.")
@click.option("--now", "now", is_flag=True,
              help="Ignore the orphan grace period and the failed-VM TTL (remove everything eligible now).")
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
@handle_errors
def gc(dry_run: bool, now: bool, as_json: bool) -> None:
    """Reconcile the database with the host and collect garbage, once.

    \b
    Shows, as a table (kind, id, owner, why), what the background loops would do:
      dead_vm / wedged_vm   a VM row whose process or directory is gone, or stuck → failed
      stray_process         a failed VM that still has a process → stopped
      orphan                a VM directory/process/port no row owns → destroyed (after the grace period)
      browser_vm            a Browser VM whose sign-in session ended → destroyed
      session_expired       a sign-in session past its expiry that no worker holds → expired
      failed_vm             a failed VM past its TTL → destroyed with all its resources
      destroyed_row         a destroyed VM's row past the retention → deleted (its events are kept)
      tickets               expired or used websocket tickets → purged
    Without --dry-run it does it (RESULT column: done, waiting, lost = someone else changed it).
    """
    from remotecli.background.gc import GarbageCollector
    from remotecli.background.reconciler import Reconciler

    with app_context() as ctx:
        reconciler = Reconciler(ctx, owner="cli-gc", orphan_grace_s=0.0 if now else None)
        collector = GarbageCollector(ctx, owner="cli-gc", failed_ttl_s=0.0 if now else None)
        findings = reconciler.run_once(dry_run=dry_run).findings
        findings += collector.run_once(dry_run=dry_run).findings
        names = {u.id: u.name for u in users_service.list_users(ctx.db)}
    if as_json:
        print_json([{"kind": f.kind, "id": f.id, "owner": names.get(f.owner or "", f.owner), "why": f.why,
                     "action": f.action, "result": f.result} for f in findings])
        return
    print_table(["kind", "id", "owner", "why", "action", "result"], _rows(findings, names))


def register(main: click.Group) -> None:
    main.add_command(gc)
