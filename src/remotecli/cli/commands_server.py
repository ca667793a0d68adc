"""``remotecli up``, ``serve``, ``doctor`` and ``images``."""

from __future__ import annotations

import secrets
import sys
import time
from typing import Any

import click

from remotecli.cli.common import app_context, handle_errors, print_json, print_table, settings_from_env
from remotecli.config import Settings
from remotecli.context import AppContext
from remotecli.errors import InvalidInput, RemotecliError
from remotecli.logging import configure_logging


def _serve(ctx: AppContext, host: str, port: int) -> None:
    import uvicorn

    from remotecli.app import create_app

    settings = ctx.settings
    if bool(settings.tls_cert) != bool(settings.tls_key):
        raise InvalidInput("Give both --tls-cert and --tls-key (or neither).")
    app = create_app(ctx)
    config = uvicorn.Config(
        app, host=host, port=port, log_config=None, access_log=False, lifespan="on",
        ssl_certfile=str(settings.tls_cert) if settings.tls_cert else None,
        ssl_keyfile=str(settings.tls_key) if settings.tls_key else None,
        # X-Forwarded-For/-Proto are honoured only from the configured proxies (none by default).
        proxy_headers=bool(settings.trusted_proxies),
        forwarded_allow_ips=settings.trusted_proxies or None,
    )
    uvicorn.Server(config).run()


def _tls_options(func: Any) -> Any:
    func = click.option("--tls-key", type=click.Path(exists=True, dir_okay=False), default=None,
                        help="Private key (PEM) for --tls-cert.")(func)
    func = click.option("--tls-cert", type=click.Path(exists=True, dir_okay=False), default=None,
                        help="Serve HTTPS with this certificate (PEM); session cookies become Secure.")(func)
    return func


def _apply_tls(settings: Settings, tls_cert: str | None, tls_key: str | None) -> None:
    from pathlib import Path

    if tls_cert:
        settings.tls_cert = Path(tls_cert)
    if tls_key:
        settings.tls_key = Path(tls_key)


def _needs_images(ctx: AppContext) -> bool:
    return ctx.driver.name in ("qemu", "firecracker")


class _Progress:
    """Renders the image builder's progress events: a bar on a terminal, plain lines otherwise."""

    def __init__(self) -> None:
        self._tty = sys.stderr.isatty()
        self._last = ""
        self._started = time.monotonic()

    def __call__(self, event: Any) -> None:
        percent = getattr(event, "percent", None)
        bar = ""
        if percent is not None:
            filled = int(max(0.0, min(100.0, percent)) / 5)
            bar = f"[{'#' * filled}{'.' * (20 - filled)}] {percent:5.1f}% "
        line = f"  {event.target:8} {bar}{event.stage}: {event.message}"
        if line == self._last:
            return
        self._last = line
        elapsed = f" ({time.monotonic() - self._started:.0f} s)"
        if self._tty:
            click.echo("\r\033[K" + line[:150] + elapsed, err=True, nl=event.stage in ("done", "up_to_date"))
        else:
            click.echo(line + elapsed, err=True)


def build_images(settings: Settings, vm_types: list[str], force: bool = False) -> list[Any]:
    from remotecli import images

    results = images.build(settings, vm_types, progress=_Progress(), force=force)
    for result in results:
        size = f"{result.size_bytes / 2**20:.0f} MiB"
        verdict = "built" if result.built else "up to date, nothing to do"
        click.echo(f"  {result.target:8} {verdict} (hash {result.hash}, {size}, {result.seconds:.1f} s)", err=True)
    return list(results)


@click.command()
@click.option("--host", default=None, help="Bind address (default from settings: 127.0.0.1).")
@click.option("--port", type=int, default=None, help="Port (default from settings: 8080).")
@click.option("--skip-images", is_flag=True, help="Do not build missing guest images before serving.")
@_tls_options
@handle_errors
def up(host: str | None, port: int | None, skip_images: bool, tls_cert: str | None, tls_key: str | None) -> None:
    """First run and every run: migrate, build missing images, create an admin, serve."""
    settings = settings_from_env()
    _apply_tls(settings, tls_cert, tls_key)
    settings.ensure_dirs()
    configure_logging(settings.log_level, settings.logs_dir / "controller.log", stderr=False)
    click.echo(f"remotecli: data directory {settings.data_dir}", err=True)
    ctx = AppContext.create(settings)
    click.echo(f"remotecli: database ready ({ctx.db.dialect}, schema {ctx.db.current_revision()})", err=True)
    availability = ctx.driver.availability()
    click.echo(f"remotecli: driver {ctx.driver.name}: {availability.detail}", err=True)
    confined = ctx.driver.guest_confinement(repair=True) if availability.ok else None
    if confined is not None:
        marker = "" if confined.ok else "WARNING: "
        click.echo(f"remotecli: {marker}guest isolation: {confined.detail}", err=True)
        if "egress" in confined.facts:  # the effective egress policy, in one line
            click.echo(f"remotecli: {marker}{confined.facts['egress']}{'' if confined.ok else ' (NOT in force)'}",
                       err=True)
    if _needs_images(ctx) and not skip_images:
        click.echo("remotecli: checking guest images (the first build takes a few minutes)…", err=True)
        build_images(settings, ["cli", "browser"])
    if _needs_images(ctx):
        _echo_provider_drift(settings, ctx)
    from remotecli.services import users as users_service

    first_login: tuple[str, str] | None = None
    if not users_service.list_users(ctx.db):
        admin = users_service.create_user(ctx.db, "admin", is_admin=True)
        _row, token = users_service.create_token(ctx.db, admin, name="first-run")
        # A generated password (never a default): shown once here, stored as an Argon2id hash.
        password = secrets.token_urlsafe(12)
        users_service.set_password(ctx.db, admin.name, password)
        first_login = (admin.name, password)
        click.echo("remotecli: created the first admin user 'admin'. Its API token (shown once):", err=True)
        click.echo(f"  {token}", err=True)
    bind_host = host or settings.host
    bind_port = port or settings.port
    scheme = "https" if settings.tls_cert else "http"
    url = settings.public_url or f"{scheme}://{bind_host}:{bind_port}"
    click.echo(f"remotecli: serving on {url}  (dashboard: {url}/dashboard, API: {url}/api/v1, docs: {url}/docs)",
               err=True)
    if first_login:
        click.echo(f"remotecli: first dashboard login (shown once): user {first_login[0]}, password "
                   f"{first_login[1]}  — change it with 'remotecli users set-password admin'", err=True)
    if settings.oidc_enabled:
        click.echo(f"remotecli: single sign-on through {settings.oidc_issuer}; the redirect URI to register there "
                   f"is {url.rstrip('/')}/auth/oidc/callback", err=True)
    configure_logging(settings.log_level, settings.logs_dir / "controller.log", stderr=settings.log_to_stderr)
    _serve(ctx, bind_host, bind_port)


@click.command()
@click.option("--host", default=None, help="Bind address (default from settings).")
@click.option("--port", type=int, default=None, help="Port (default from settings).")
@_tls_options
@handle_errors
def serve(host: str | None, port: int | None, tls_cert: str | None, tls_key: str | None) -> None:
    """Run the controller (API, dashboard, background loops) in the foreground."""
    settings = settings_from_env()
    _apply_tls(settings, tls_cert, tls_key)
    settings.ensure_dirs()
    configure_logging(settings.log_level, settings.logs_dir / "controller.log", stderr=settings.log_to_stderr)
    ctx = AppContext.create(settings)
    _serve(ctx, host or settings.host, port or settings.port)


def _drift_check(ctx: AppContext) -> tuple[str, bool, str]:
    """Drift between the database and the host: what a reconciler pass would fix (changes nothing)."""
    from collections import Counter

    from remotecli.background.reconciler import Reconciler

    findings = Reconciler(ctx, owner="doctor").run_once(dry_run=True).findings
    kinds = Counter(f.kind for f in findings)
    if not kinds:
        return ("drift", True, "database and host agree")
    summary = ", ".join(f"{n} {kind}" for kind, n in sorted(kinds.items()))
    return ("drift", False, f"{summary}: see 'remotecli gc --dry-run' (the reconciler fixes it within its interval)")


def _echo_provider_drift(settings: Settings, ctx: AppContext | None) -> None:
    """The CLIs' versions and every difference between their OAuth constants and the profiles."""
    from remotecli.services import provider_drift

    clis, found = provider_drift.installed_differences(settings, effective=dict(ctx.providers) if ctx else None)
    for line in provider_drift.describe(clis, found):
        warn = line.startswith(("DRIFT", "UNCHECKED"))
        click.echo(f"remotecli: {'WARNING: ' if warn else ''}{line}", err=True)


def _provider_checks(ctx: AppContext) -> list[tuple[str, bool, str]]:
    """One doctor line per provider: the CLI version in the cli image and how the profile differs."""
    from remotecli.services import provider_drift

    clis, found = provider_drift.installed_differences(ctx.settings, effective=dict(ctx.providers))
    if clis is None:
        return [("provider profiles", not _needs_images(ctx), provider_drift.describe(None, [])[0])]
    checks: list[tuple[str, bool, str]] = []
    for name, cli in sorted(clis.items()):
        mine = [d for d in found if d.provider == name]
        problems = [d for d in mine if d.kind != "override"]
        detail = "; ".join(d.message.removeprefix(f"{name}: ") for d in mine) or "matches the built-in profile"
        checks.append((f"provider {name}", not problems, f"{cli.label}: {detail}"))
    return checks


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
def doctor(as_json: bool) -> None:
    """Check the host: database, migrations, driver (KVM or TCG), QEMU, images."""
    checks: list[tuple[str, bool, str]] = []
    try:
        with app_context() as ctx:
            from sqlalchemy import text

            with ctx.db.engine.connect() as connection:
                connection.execute(text("SELECT 1"))
            checks.append(("database", True, f"{ctx.db.dialect} reachable"))
            current, head = ctx.db.current_revision(), ctx.db.head_revision()
            checks.append(("migrations", current == head, f"at {current} (head {head})"))
            availability = ctx.driver.availability()
            facts = ", ".join(f"{k} {v}" for k, v in availability.facts.items())
            checks.append((f"driver {ctx.driver.name}", availability.ok,
                           availability.detail + (f" ({facts})" if facts else "")))
            confined = ctx.driver.guest_confinement() if availability.ok else None
            if confined is not None:
                checks.append(("guest isolation", confined.ok, confined.detail))
                if "egress" in confined.facts:
                    checks.append(("guest egress", confined.ok, confined.facts["egress"]
                                   + ("" if confined.ok else " (NOT in force: see guest isolation)")))
            if _needs_images(ctx):
                from remotecli import images

                for item in images.status(ctx.settings):
                    if item.built:
                        detail = f"built (hash {item.hash}, {item.built_at})"
                    else:
                        detail = f"not built for the current recipe (hash {item.hash}): run 'remotecli images build'"
                    checks.append((f"image {item.target}", item.built, detail))
            checks.extend(_provider_checks(ctx))
            if ctx.settings.oidc_enabled:
                from remotecli.services import oidc

                checks.append(("single sign-on", *oidc.check_provider(ctx.settings)))
            from remotecli.services import forwarded

            checks.append(forwarded.doctor_check(ctx.settings))
            checks.append(_capacity_check(ctx))
            checks.append(_drift_check(ctx))
    except RemotecliError as exc:
        checks.append(("controller", False, exc.message))
    except Exception as exc:
        checks.append(("controller", False, f"{type(exc).__name__}: {exc}"))
    if as_json:
        print_json([{"check": name, "ok": ok, "detail": detail} for name, ok, detail in checks])
    else:
        print_table(["check", "ok", "detail"], [[n, "yes" if ok else "NO", d] for n, ok, d in checks])
    sys.exit(0 if all(ok for _, ok, _ in checks) else 1)


def _capacity_check(ctx: AppContext) -> tuple[str, bool, str]:
    """Capacity used and free; not ok when the host cannot hold even the smallest default VM."""
    from remotecli.domain.states import VmType
    from remotecli.services import capacity

    room = capacity.usage(ctx)
    smallest = min(ctx.settings.vm_defaults(t.value)[1] for t in VmType)
    ok = room.capacity.memory_mib >= smallest and room.capacity.vcpus >= 1
    return ("capacity", ok, f"{room.describe()}; from {room.capacity.source}"
            + ("" if ok else f" (not even one {smallest} MiB VM fits: check host_memory_mib and its reserve)"))


@click.group()
def images() -> None:
    """Build and inspect guest images (kernel, initramfs, root filesystems)."""


@images.command("build")
@click.argument("which", type=click.Choice(["cli", "browser", "all"]), default="all")
@click.option("--force", is_flag=True, help="Rebuild even when the recipe is unchanged.")
@handle_errors
def images_build(which: str, force: bool) -> None:
    """Build the guest images (cached by recipe hash: unchanged recipes are not rebuilt)."""
    settings = settings_from_env()
    settings.ensure_dirs()
    started = time.monotonic()
    build_images(settings, ["cli", "browser"] if which == "all" else [which], force=force)
    if which in ("cli", "all"):
        _echo_provider_drift(settings, None)
    click.echo(f"done in {time.monotonic() - started:.1f} s", err=True)


@images.command("status")
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
@handle_errors
def images_status(as_json: bool) -> None:
    """Show which images are built for the current recipes."""
    from remotecli import images as images_module

    items = images_module.status(settings_from_env())
    if as_json:
        print_json([{"target": i.target, "hash": i.hash, "built": i.built, "path": str(i.path),
                     "size_bytes": i.size_bytes, "built_at": i.built_at} for i in items])
        return
    print_table(["image", "built", "hash", "size", "built at", "path"],
                [[i.target, "yes" if i.built else "NO", i.hash,
                  f"{i.size_bytes / 2**20:.0f} MiB" if i.size_bytes else "-", i.built_at or "-", i.path]
                 for i in items])


@images.command("outdated")
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
@handle_errors
def images_outdated(as_json: bool) -> None:
    """List newer releases of the pinned CLIs on the npm registry and the OAuth constant
    differences they would bring (downloads their packages into a temporary directory)."""
    import tempfile
    from pathlib import Path

    from remotecli.images import cli_constants
    from remotecli.images.recipes import CLI_VERSIONS
    from remotecli.services import provider_drift

    settings = settings_from_env()
    builtin = provider_drift.builtin_profiles(settings)
    rows: list[dict[str, Any]] = []
    newer: dict[str, str] = {}
    for provider, package in cli_constants.CLI_PACKAGES.items():
        pinned = CLI_VERSIONS[package]
        try:
            latest = cli_constants.npm_latest_version(package)
        except cli_constants.NpmError as exc:
            rows.append({"provider": provider, "package": package, "pinned": pinned, "latest": None,
                         "outdated": None, "error": str(exc), "differences": []})
            continue
        rows.append({"provider": provider, "package": package, "pinned": pinned, "latest": latest,
                     "outdated": latest != pinned, "error": None, "differences": []})
        if latest != pinned:
            newer[provider] = latest
    if newer:
        with tempfile.TemporaryDirectory(prefix="remotecli-outdated-") as tmp:
            if not as_json:
                specs = ", ".join(f"{cli_constants.CLI_PACKAGES[p]}@{v}" for p, v in newer.items())
                click.echo(f"remotecli: downloading {specs} to read their OAuth constants…", err=True)
            node_modules = cli_constants.fetch_packages(newer, Path(tmp))
            found = provider_drift.differences(
                {p: cli_constants.extract(p, node_modules / cli_constants.CLI_PACKAGES[p]) for p in newer}, builtin)
        for row in rows:
            row["differences"] = [d.as_dict() for d in found if d.provider == row["provider"]]
    if as_json:
        print_json(rows)
        return
    print_table(["provider", "package", "pinned", "latest", "status"],
                [[r["provider"], r["package"], r["pinned"], r["latest"] or "-",
                  r["error"] or ("newer release" if r["outdated"] else "up to date")] for r in rows])
    for row in rows:
        if row["outdated"]:
            changes = row["differences"]
            click.echo(f"{row['package']} {row['latest']} against the built-in {row['provider']} profile: "
                       + ("no OAuth constant differences" if not changes else f"{len(changes)} difference(s)"))
            for change in changes:
                click.echo(f"  {change['kind']}: {change['message']}")


def register(main: click.Group) -> None:
    main.add_command(up)
    main.add_command(serve)
    main.add_command(doctor)
    main.add_command(images)
