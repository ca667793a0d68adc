"""``remotecli auth ...``: start, watch, explain and cancel sign-in sessions."""

from __future__ import annotations

import time

import click

from remotecli.cli.common import app_context, fmt_time, handle_errors, print_json, print_table
from remotecli.domain.states import AUTH_TERMINAL, AuthStatus
from remotecli.services import auth_flow, tickets
from remotecli.services import users as users_service
from remotecli.services.users import Principal


def _session_dict(auth: object) -> dict[str, object]:
    keys = ("id", "user_id", "provider", "status", "message", "error_code", "error_message", "cli_vm_id",
            "browser_vm_id", "credential_meta", "created_at", "updated_at", "expires_at")
    return {key: getattr(auth, key) for key in keys}


@click.group()
def auth() -> None:
    """Sign users in to their CLIs' providers through an isolated Browser VM."""


@auth.command("start")
@click.option("--user", required=True, help="Whose CLI workspace receives the credentials.")
@click.option("--provider", required=True, help="claude_code, codex, gemini, or a custom profile.")
@click.option("--wait/--no-wait", default=True, show_default=True,
              help="Wait until the login screen is ready and print its VNC URL.")
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
@handle_errors
def auth_start(user: str, provider: str, wait: bool, as_json: bool) -> None:
    """Start a sign-in session; a running controller ('remotecli serve') advances it.

    Prints the session id and, once the Browser VM shows the login page, the VNC websocket URL
    (open it with noVNC, or use the dashboard's /dashboard/remote-cli/auth page).
    """
    with app_context() as ctx:
        owner = users_service.get_user_by_name(ctx.db, user)
        principal = Principal(owner.id, owner.name, owner.is_admin)
        session = auth_flow.start_session(ctx, principal, provider)
        if not as_json:
            click.echo(session.id)
        vnc_url = None
        if wait:
            deadline = time.monotonic() + ctx.settings.auth_page_timeout_s + ctx.settings.vm_boot_timeout_s
            last = ""
            while time.monotonic() < deadline:
                session = auth_flow.get_session(ctx, None, session.id)
                if session.message != last and not as_json:
                    click.echo(f"  {session.status}: {session.message}", err=True)
                    last = session.message or ""
                if session.status == AuthStatus.AWAITING_USER.value:
                    ticket = tickets.issue_ticket(ctx, principal, "vnc", session.id)
                    base = ctx.settings.public_url or f"http://{ctx.settings.host}:{ctx.settings.port}"
                    ws = "ws" + base[len("http"):]
                    vnc_url = f"{ws}/api/v1/auth-sessions/{session.id}/vnc?token={ticket}"
                    break
                if AuthStatus(session.status) in AUTH_TERMINAL:
                    break
                time.sleep(0.5)
            else:
                click.echo("  (no controller advanced the session: is 'remotecli serve' running?)", err=True)
    if as_json:
        print_json({**_session_dict(session), "vnc_url": vnc_url})
    elif vnc_url:
        click.echo(vnc_url)


@auth.command("status")
@click.argument("session_id")
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
@handle_errors
def auth_status(session_id: str, as_json: bool) -> None:
    """Show a sign-in session: status, message, VMs, credential metadata (never a token)."""
    with app_context() as ctx:
        session = auth_flow.get_session(ctx, None, session_id)
    data = _session_dict(session)
    if as_json:
        print_json(data)
        return
    for key, value in data.items():
        if hasattr(value, "isoformat"):
            value = fmt_time(value)  # type: ignore[arg-type]
        click.echo(f"{key:14} {value if value is not None else '-'}")


@auth.command("timeline")
@click.argument("session_id")
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
@handle_errors
def auth_timeline(session_id: str, as_json: bool) -> None:
    """The session's timeline, as the seed's table: time, event, status."""
    with app_context() as ctx:
        events = auth_flow.session_events(ctx, None, session_id)
    if as_json:
        print_json([{"at": e.at, "module": e.module, "kind": e.kind, "message": e.message, "vm_id": e.vm_id,
                     "from_status": e.from_status, "to_status": e.to_status} for e in events])
        return
    rows = []
    for e in events:
        status = e.to_status or ""
        subject = f" [{e.vm_id[:11]}]" if e.vm_id else ""
        rows.append([e.at.strftime("%H:%M:%S.%f")[:-3], f"{e.message}{subject}", status])
    print_table(["time (UTC)", "event", "status"], rows)


@auth.command("cancel")
@click.argument("session_id")
@handle_errors
def auth_cancel(session_id: str) -> None:
    """Cancel a sign-in session; its Browser VM is destroyed."""
    with app_context() as ctx:
        session = auth_flow.cancel_session(ctx, None, session_id)
    click.echo(f"{session.id}: {session.status}")


@auth.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
@handle_errors
def auth_list(as_json: bool) -> None:
    """Recent sign-in sessions of every user."""
    with app_context() as ctx:
        sessions = auth_flow.list_sessions(ctx, None)
    if as_json:
        print_json([_session_dict(s) for s in sessions])
        return
    print_table(["id", "provider", "status", "created", "message"],
                [[s.id, s.provider, s.status, fmt_time(s.created_at), (s.message or "")[:60]] for s in sessions])


def register(main: click.Group) -> None:
    main.add_command(auth)
