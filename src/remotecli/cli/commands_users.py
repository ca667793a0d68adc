"""``remotecli users ...`` and ``remotecli tokens ...``."""

from __future__ import annotations

import datetime as dt
import sys

import click

from remotecli.cli.common import app_context, fmt_time, handle_errors, print_json, print_table
from remotecli.errors import InvalidInput
from remotecli.services import users as users_service


@click.group()
def users() -> None:
    """Manage dashboard and API users."""


@users.command("create")
@click.argument("name")
@click.option("--admin", is_flag=True, help="Give the user the admin role (sees every VM and session).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@handle_errors
def users_create(name: str, admin: bool, as_json: bool) -> None:
    """Create user NAME (lower-case letters, digits, '.', '_', '-')."""
    with app_context() as ctx:
        user = users_service.create_user(ctx.db, name, is_admin=admin)
    if as_json:
        print_json({"id": user.id, "name": user.name, "is_admin": user.is_admin})
    else:
        click.echo(f"Created {'admin' if admin else 'user'} {user.name} ({user.id}).")
        click.echo(f"Give them an API token with: remotecli tokens create {user.name}")


@users.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
@handle_errors
def users_list(as_json: bool) -> None:
    """List users."""
    with app_context() as ctx:
        rows = users_service.list_users(ctx.db)
    if as_json:
        print_json([{"id": u.id, "name": u.name, "is_admin": u.is_admin, "created_at": u.created_at} for u in rows])
        return
    print_table(["name", "role", "id", "created"],
                [[u.name, "admin" if u.is_admin else "user", u.id, fmt_time(u.created_at)] for u in rows])


@users.command("set-password")
@click.argument("name")
@click.option("--password-stdin", is_flag=True,
              help="Read the password from standard input (first line) instead of prompting.")
@handle_errors
def users_set_password(name: str, password_stdin: bool) -> None:
    """Set the dashboard password of user NAME (stored as an Argon2id hash)."""
    if password_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        password = click.prompt("New password", hide_input=True, confirmation_prompt="Repeat the password")
    with app_context() as ctx:
        user = users_service.set_password(ctx.db, name, password)
    click.echo(f"Password of {user.name} set; they can sign in to the dashboard at /login.")


@users.command("disable")
@click.argument("name")
@handle_errors
def users_disable(name: str) -> None:
    """Disable user NAME: their API tokens, dashboard sessions and single sign-ons stop working at once."""
    with app_context() as ctx:
        users_service.set_disabled(ctx.db, name, True)
    click.echo(f"Disabled {name}; 'remotecli users enable {name}' undoes it.")


@users.command("enable")
@click.argument("name")
@handle_errors
def users_enable(name: str) -> None:
    """Enable user NAME again."""
    with app_context() as ctx:
        users_service.set_disabled(ctx.db, name, False)
    click.echo(f"Enabled {name}.")


@users.command("delete")
@click.argument("name")
@click.option("--purge", is_flag=True, help="Also delete the user's home volume (their files), for good.")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@handle_errors
def users_delete(name: str, purge: bool, yes: bool) -> None:
    """Delete user NAME: their VMs are destroyed; their home volume is kept (an orphan that 'gc'
    removes after REMOTECLI_WORKSPACE_ORPHAN_RETENTION_S) unless --purge."""
    from remotecli.services import user_removal

    if not yes:
        what = "their VMs and their home volume (all their files)" if purge else "their VMs (their home is kept)"
        click.confirm(f"Delete {name}, {what}?", abort=True)
    with app_context() as ctx:
        removal = user_removal.delete_user(ctx, name, purge=purge)
    kept = (f"; home volume {removal.volume_id} kept" if removal.volume_kept
            else "; home volume deleted" if removal.volume_id else "")
    click.echo(f"Deleted {name} ({len(removal.vms_destroyed)} VM(s) destroyed{kept}).")


@users.command("link-sso")
@click.argument("name")
@click.option("--subject", required=True, help="The user's 'sub' claim at the identity provider.")
@click.option("--issuer", default=None, help="The provider's issuer URL (default: REMOTECLI_OIDC_ISSUER).")
@handle_errors
def users_link_sso(name: str, subject: str, issuer: str | None) -> None:
    """Let user NAME sign in to the dashboard with single sign-on as the provider account SUBJECT.

    Single sign-on never links accounts by name or email by itself: without this, a first sign-in
    creates a new user (REMOTECLI_OIDC_AUTO_CREATE_USERS) even if a local user has the same name.
    """
    from remotecli.services import oidc

    with app_context() as ctx:
        issuer = issuer or ctx.settings.oidc_issuer
        if not issuer:
            raise InvalidInput("Give --issuer, or set REMOTECLI_OIDC_ISSUER.")
        identity = oidc.link_identity(ctx.db, name, subject, issuer)
    click.echo(f"Linked {name} to subject {subject!r} at {identity.issuer}.")


@users.command("unlink-sso")
@click.argument("name")
@handle_errors
def users_unlink_sso(name: str) -> None:
    """Remove user NAME's single sign-on identities (without a password they can no longer sign in)."""
    from remotecli.services import oidc

    with app_context() as ctx:
        count = oidc.unlink_identities(ctx.db, name)
    click.echo(f"Removed {count} single sign-on identit{'y' if count == 1 else 'ies'} of {name}.")


@click.group()
def tokens() -> None:
    """Manage API tokens (shown once, stored only as hashes)."""


@tokens.command("create")
@click.argument("user")
@click.option("--name", default="", help="A label for the token.")
@click.option("--ttl-days", type=click.IntRange(min=1), default=None, help="Expire after this many days.")
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
@handle_errors
def tokens_create(user: str, name: str, ttl_days: int | None, as_json: bool) -> None:
    """Create an API token for USER and print it (this is the only time it is shown)."""
    with app_context() as ctx:
        owner = users_service.get_user_by_name(ctx.db, user)
        row, token = users_service.create_token(
            ctx.db, owner, name=name, ttl=dt.timedelta(days=ttl_days) if ttl_days else None
        )
    if as_json:
        print_json({"id": row.id, "user": owner.name, "token": token, "expires_at": row.expires_at})
    else:
        click.echo(token)
        click.echo(f"(token for {owner.name}; store it now, it is not shown again)", err=True)


@tokens.command("list")
@click.option("--user", default=None, help="Only this user's tokens.")
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
@handle_errors
def tokens_list(user: str | None, as_json: bool) -> None:
    """List API tokens (id, owner, label, created, expires, last used, revoked); never the token."""
    with app_context() as ctx:
        owner = users_service.get_user_by_name(ctx.db, user) if user else None
        rows = users_service.list_tokens(ctx.db, owner)
    if as_json:
        print_json([{"id": t.id, "user": name, "name": t.name, "prefix": t.prefix, "created_at": t.created_at,
                     "expires_at": t.expires_at, "last_used_at": t.last_used_at, "revoked_at": t.revoked_at}
                    for t, name in rows])
        return
    print_table(["id", "user", "label", "prefix", "created", "expires", "last used", "revoked"],
                [[t.id, name, t.name or "-", t.prefix + "…", fmt_time(t.created_at), fmt_time(t.expires_at),
                  fmt_time(t.last_used_at), fmt_time(t.revoked_at)] for t, name in rows])


@tokens.command("revoke")
@click.argument("token_id")
@handle_errors
def tokens_revoke(token_id: str) -> None:
    """Revoke the API token TOKEN_ID (or a unique prefix of it): it stops working at once."""
    with app_context() as ctx:
        token = users_service.revoke_token(ctx.db, token_id)
    click.echo(f"Revoked {token.id} ({token.prefix}…).")


@click.group()
def keys() -> None:
    """Manage the encryption key that protects secrets at rest."""


@keys.command("rotate")
@handle_errors
def keys_rotate() -> None:
    """Generate a new AES-256-GCM key and re-encrypt every stored secret with it (crash-safe)."""
    from remotecli.services.keys import rotate_keys

    with app_context() as ctx:
        result = rotate_keys(ctx.db, ctx.settings.key_file)
    click.echo(f"Rotated the key: re-encrypted {result.agent_secrets} agent secret(s) and "
               f"{result.credentials} held credential(s).")


def register(main: click.Group) -> None:
    main.add_command(keys)
    main.add_command(users)
    main.add_command(tokens)
