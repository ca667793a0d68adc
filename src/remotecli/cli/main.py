"""The ``remotecli`` command: operate the controller from its host.

The CLI talks to the database and the drivers directly (it is the operator's tool on the host);
users reach the controller through the REST API and the dashboard. Errors print their message in
words and exit with status 1 (bad input: 2).
"""

from __future__ import annotations

import click

from remotecli.cli import (
    commands_auth,
    commands_gc,
    commands_server,
    commands_users,
    commands_vm,
    commands_workspace,
)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="remotecli")
def main() -> None:
    """remotecli: per-user microVMs for AI coding CLIs, with isolated browser login.

    \b
    First time:   remotecli up          (migrate, build images, create an admin, serve)
    Every day:    remotecli serve
    Check host:   remotecli doctor
    Clean up:     remotecli gc --dry-run

    Settings come from REMOTECLI_* environment variables or <data dir>/config.toml
    (REMOTECLI_DATA_DIR, default ~/.local/share/remotecli).
    """


commands_server.register(main)
commands_users.register(main)
commands_vm.register(main)
commands_auth.register(main)
commands_gc.register(main)
commands_workspace.register(main)
