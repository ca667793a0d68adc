"""Provider drift: the built-in provider profiles against the OAuth constants of the CLIs we ship.

A profile that does not say what its CLI says fails real sign-ins (or the CLI's first refresh).
The constants come from the ``cli`` image's manifest (:func:`remotecli.images.builder.
installed_cli_constants`, recorded by ``images build``) or from any set of packages
(``images outdated``, the CI test). :func:`differences` lists, in words:

- ``drift``: the built-in profile and the CLI disagree (a bug to fix in provider_profiles.toml,
  or a pin to move back);
- ``override``: the operator set a different value (environment or config file): their choice,
  reported so it is not a surprise, not counted as drift;
- ``unchecked``: the value could not be read from the CLI package (the extractor needs a look).

Profile parameters the CLI does not send (Gemini's ``prompt=consent``) are deliberate additions and
are not reported; the ``pkce`` and token-request style are not in the packages' constants either.
Client secrets are compared by SHA-256 and never named.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from remotecli.config import Settings
from remotecli.images.cli_constants import CliConstants, secret_digest
from remotecli.profiles import ProviderProfile, load_profiles

__all__ = [
    "DifferenceKind",
    "ProviderDifference",
    "builtin_profiles",
    "describe",
    "differences",
    "installed_differences",
]

DifferenceKind = Literal["drift", "override", "unchecked"]

_FIELDS: tuple[tuple[str, str], ...] = (
    ("authorize_url", "authorize URL"),
    ("token_url", "token URL"),
    ("client_id", "client id"),
    ("client_secret", "client secret"),
    ("scopes", "scope list"),
    ("redirect_uri", "redirect URI"),
    ("extra_authorize_params", "set of authorize parameters"),
)


@dataclass(frozen=True, slots=True)
class ProviderDifference:
    provider: str
    field: str  # a profile field name, or "package" for an unreadable package
    kind: DifferenceKind
    message: str  # a sentence naming the provider, the CLI version and both values (never a secret)

    def as_dict(self) -> dict[str, str]:
        return {"provider": self.provider, "field": self.field, "kind": self.kind, "message": self.message}


def builtin_profiles(settings: Settings) -> dict[str, ProviderProfile]:
    """The profiles exactly as shipped: no config file, no environment overrides."""
    return load_profiles(settings, {"REMOTECLI_CONFIG_FILE": os.devnull})


def installed_differences(
    settings: Settings,
    effective: Mapping[str, ProviderProfile] | None = None,
    environ: Mapping[str, str] | None = None,
) -> tuple[dict[str, CliConstants] | None, list[ProviderDifference]]:
    """The current cli image's recorded constants (``None``: not built, or built before they were
    recorded) and their differences from the built-in and the effective profiles (``effective``,
    e.g. ``ctx.providers``; default: loaded from the settings and ``environ``)."""
    from remotecli.images.builder import installed_cli_constants

    constants = installed_cli_constants(settings)
    if constants is None:
        return None, []
    current = effective if effective is not None else load_profiles(settings, environ)
    return constants, differences(constants, builtin_profiles(settings), current)


def describe(constants: Mapping[str, CliConstants] | None, found: list[ProviderDifference]) -> list[str]:
    """Lines for ``images build`` / ``up`` / ``doctor``: the CLI versions, then each difference."""
    if constants is None:
        return ["provider profiles: the cli image records no CLI constants (not built, or built before "
                "they were recorded): run 'remotecli images build cli'"]
    lines = ["CLIs in the cli image: " + ", ".join(c.label for _, c in sorted(constants.items()))]
    for item in found:
        marker = {"drift": "DRIFT", "override": "override", "unchecked": "UNCHECKED"}[item.kind]
        lines.append(f"{marker}: {item.message}")
    if not any(item.kind != "override" for item in found):
        lines.append("the built-in provider profiles match the CLIs' OAuth constants")
    return lines


def _value(profile: ProviderProfile, field: str) -> object:
    if field == "client_secret":
        return secret_digest(profile.client_secret)
    if field == "scopes":
        return frozenset(profile.scopes)
    if field == "extra_authorize_params":
        return dict(profile.extra_authorize_params)
    return getattr(profile, field)


def _show(field: str, value: object) -> str:
    if field == "client_secret":
        return "a client secret" if value else "no client secret"
    if field == "scopes":
        return "'" + " ".join(sorted(value)) + "'" if isinstance(value, frozenset) and value else "no scopes"
    if field == "extra_authorize_params" and isinstance(value, dict):
        return ", ".join(f"{k}={v}" for k, v in sorted(value.items())) or "none"
    return f"'{value}'" if value else "nothing"


def _cli_value(constants: CliConstants, field: str) -> object:
    if field == "client_secret":
        return constants.client_secret_sha256
    if field == "scopes":
        return frozenset(constants.scopes) if constants.scopes else None
    if field == "extra_authorize_params":
        return constants.extra_authorize_params or None
    return getattr(constants, field)


def _params_differ(cli: dict[str, str | None], profile: dict[str, str]) -> list[str]:
    """The CLI's authorize parameters the profile lacks or sends with another value."""
    wrong: list[str] = []
    for name, value in sorted(cli.items()):
        if name not in profile:
            wrong.append(f"{name}={value or '...'} is missing")
        elif value is not None and profile[name] != value:
            wrong.append(f"{name} is '{profile[name]}' (the CLI sends '{value}')")
    return wrong


def _differs(field: str, cli: object, profile: object) -> str | None:
    """``None`` when equal, else a phrase saying how the profile differs from the CLI."""
    if field == "extra_authorize_params":
        assert isinstance(cli, dict) and isinstance(profile, dict)
        wrong = _params_differ(cli, profile)
        return "; ".join(wrong) if wrong else None
    if field == "scopes":
        assert isinstance(cli, frozenset) and isinstance(profile, frozenset)
        if cli == profile:
            return None
        parts = []
        if cli - profile:
            parts.append("lacks " + " ".join(sorted(cli - profile)))
        if profile - cli:
            parts.append("has " + " ".join(sorted(profile - cli)) + " which the CLI does not ask for")
        return ", ".join(parts)
    if field == "client_secret":
        if cli == profile:
            return None
        if not profile:
            return "has no client secret; the CLI sends one"
        return "has a client secret the CLI does not send" if not cli else "has another client secret than the CLI"
    if cli == profile:
        return None
    return f"is {_show(field, profile)}; the CLI uses {_show(field, cli)}"


def differences(
    constants: Mapping[str, CliConstants],
    builtin: Mapping[str, ProviderProfile],
    effective: Mapping[str, ProviderProfile] | None = None,
) -> list[ProviderDifference]:
    """Every difference between the CLIs' constants and the built-in profiles (``drift``), the
    operator's overrides in ``effective`` (``override``) and what could not be read (``unchecked``)."""
    found: list[ProviderDifference] = []
    for provider, cli in sorted(constants.items()):
        label = cli.label
        for problem in cli.problems:
            found.append(ProviderDifference(provider, "package", "unchecked", f"{provider}: in {label}, {problem}"))
        profile = builtin.get(provider)
        if profile is None:
            missing = f"{provider}: no built-in profile for {label}"
            found.append(ProviderDifference(provider, "profile", "drift", missing))
            continue
        current = (effective or {}).get(provider, profile)
        for field, words in _FIELDS:
            cli_value = _cli_value(cli, field)
            if cli_value is None and field not in ("client_secret",):
                continue  # not readable from this CLI: reported as a problem above when expected
            how = _differs(field, cli_value, _value(profile, field))
            if how is not None:
                found.append(
                    ProviderDifference(provider, field, "drift", f"{provider}: the built-in {words} {how} ({label})")
                )
            if _value(current, field) != _value(profile, field):
                now = _differs(field, cli_value, _value(current, field))
                if now is None:
                    verdict = f"the same as {label}"
                elif field in ("client_secret", "extra_authorize_params", "scopes"):
                    verdict = f"against {label}, it {now}"
                else:
                    verdict = f"{label} uses {_show(field, cli_value)}"
                found.append(
                    ProviderDifference(
                        provider,
                        field,
                        "override",
                        f"{provider}: the {words} is overridden by the operator (environment or config file): "
                        f"{_show(field, _value(current, field))}; {verdict}",
                    )
                )
    return found
