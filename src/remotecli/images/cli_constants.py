"""The OAuth constants each CLI uses, read from its installed npm package.

The CLIs in the ``cli`` image are the source of truth for the provider profiles: a profile that
does not match the CLI it delivers credentials to fails a real sign-in (or, worse, works until the
CLI's first refresh). ``images build`` calls :func:`extract_all` on the package tree it installed
(``<root>/usr/local/lib/node_modules``) and records the result in the image manifest; the drift
check (:mod:`remotecli.services.provider_drift`) compares it with the built-in profiles.

What is read, per CLI (only from the package's own files, never from the network):

- Claude Code ships a native (Bun) executable with its JavaScript inside: the ``{BASE_API_URL:
  ..., CLAUDE_AI_AUTHORIZE_URL, TOKEN_URL, CLIENT_ID}`` object, the scope list of the claude.ai
  sign-in (resolved from the minified code that builds the authorize URL), the loopback redirect
  form and the ``code=true`` parameter.
- Codex ships a Rust executable (in the platform package ``@openai/codex-linux-x64``): the token
  URL, the issuer (authorize URL = issuer + ``/oauth/authorize``), the ``app_...`` client id, the
  scope string, the redirect path, the names of the extra authorize parameters and the default
  ``originator`` value. Rust string literals have no separators in the binary, so values are found
  by anchored patterns; the boolean parameters' values ("true") cannot be read and are not checked.
- Gemini CLI ships JavaScript bundles: ``OAUTH_CLIENT_ID``, ``OAUTH_CLIENT_SECRET``,
  ``OAUTH_SCOPE``, google-auth-library's ``oauth2AuthBaseUrl`` / ``oauth2TokenUrl``, the
  ``http://127.0.0.1:${port}/oauth2callback`` redirect and ``access_type: "offline"``.

Anything that cannot be found is listed in ``problems`` (in words), so a CLI release that moves
its constants shows up as "could not find ..." rather than as a silent pass. Client secrets are
never stored: only their SHA-256 (Google's installed-app secret is public, but it still does not
belong in manifests, logs or API answers).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import mmap
import re
import shutil
import subprocess
import tarfile
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "CLI_PACKAGES",
    "EXTRACTOR_VERSION",
    "CliConstants",
    "NpmError",
    "extract",
    "extract_all",
    "fetch_packages",
    "npm_latest_version",
    "npm_versions",
    "secret_digest",
]

# Bump when an extractor changes what it reports (invalidates cached extractions).
EXTRACTOR_VERSION = 1

# Profile name -> npm package the CLI image installs.
CLI_PACKAGES: dict[str, str] = {
    "claude_code": "@anthropic-ai/claude-code",
    "codex": "@openai/codex",
    "gemini": "@google/gemini-cli",
}
DISPLAY_NAMES: dict[str, str] = {"claude_code": "Claude Code", "codex": "Codex", "gemini": "Gemini CLI"}
# The linux-x64 platform package holding the native executable (npm spec template, then the
# directory npm installs it under inside the main package).
_PLATFORM: dict[str, tuple[str, str]] = {
    "claude_code": ("@anthropic-ai/claude-code-linux-x64@{version}", "@anthropic-ai/claude-code-linux-x64"),
    "codex": ("@openai/codex@{version}-linux-x64", "@openai/codex-linux-x64"),
}


def secret_digest(secret: str | None) -> str | None:
    """``sha256:<hex>`` of a client secret (what manifests and comparisons hold), or ``None``."""
    return "sha256:" + hashlib.sha256(secret.encode("utf-8")).hexdigest() if secret else None


@dataclass(frozen=True)
class CliConstants:
    """What one installed CLI uses to sign in. ``None`` / empty: not found (see ``problems``)."""

    provider: str
    package: str
    version: str | None
    authorize_url: str | None = None
    token_url: str | None = None
    client_id: str | None = None
    client_secret_sha256: str | None = None
    scopes: tuple[str, ...] = ()
    redirect_uri: str | None = None  # "{port}" for a port chosen at sign-in
    extra_authorize_params: dict[str, str | None] = field(default_factory=dict)  # None: value unreadable
    problems: tuple[str, ...] = ()

    @property
    def label(self) -> str:
        return f"{DISPLAY_NAMES.get(self.provider, self.package)} {self.version or '(version unknown)'}"

    def as_dict(self) -> dict[str, Any]:
        return {
            "provider": self.provider,
            "package": self.package,
            "version": self.version,
            "authorize_url": self.authorize_url,
            "token_url": self.token_url,
            "client_id": self.client_id,
            "client_secret_sha256": self.client_secret_sha256,
            "scopes": list(self.scopes),
            "redirect_uri": self.redirect_uri,
            "extra_authorize_params": dict(sorted(self.extra_authorize_params.items())),
            "problems": list(self.problems),
        }

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> CliConstants:
        def opt(key: str) -> str | None:
            value = doc.get(key)
            return value if isinstance(value, str) and value else None

        extra = doc.get("extra_authorize_params")
        return cls(
            provider=str(doc.get("provider", "")),
            package=str(doc.get("package", "")),
            version=opt("version"),
            authorize_url=opt("authorize_url"),
            token_url=opt("token_url"),
            client_id=opt("client_id"),
            client_secret_sha256=opt("client_secret_sha256"),
            scopes=tuple(str(s) for s in doc.get("scopes") or []),
            redirect_uri=opt("redirect_uri"),
            extra_authorize_params=(
                {str(k): (None if v is None else str(v)) for k, v in extra.items()} if isinstance(extra, dict) else {}
            ),
            problems=tuple(str(p) for p in doc.get("problems") or []),
        )


# -- extraction ---------------------------------------------------------------------------------


def extract_all(node_modules: Path) -> dict[str, CliConstants]:
    """Constants of every CLI in :data:`CLI_PACKAGES` installed under ``node_modules``."""
    return {provider: extract(provider, node_modules / package) for provider, package in CLI_PACKAGES.items()}


def extract(provider: str, package_dir: Path) -> CliConstants:
    """The constants of one CLI whose npm package is installed at ``package_dir``."""
    package = CLI_PACKAGES[provider]
    version = _package_version(package_dir)
    if version is None:
        return CliConstants(provider, package, None, problems=(f"{package} is not installed (no package.json)",))
    extractor = {"claude_code": _extract_claude, "codex": _extract_codex, "gemini": _extract_gemini}[provider]
    return extractor(package_dir, package, version)


def _package_version(package_dir: Path) -> str | None:
    try:
        doc = json.loads((package_dir / "package.json").read_text("utf-8"))
    except (OSError, ValueError):
        return None
    version = doc.get("version") if isinstance(doc, dict) else None
    return version if isinstance(version, str) and version else None


@contextlib.contextmanager
def _mapped(path: Path) -> Iterator[bytes]:
    with path.open("rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as data:
        yield data  # type: ignore[misc]  # mmap supports the bytes-like API used here


def _largest(candidates: list[Path]) -> Path | None:
    existing = [p for p in candidates if p.is_file() and not p.is_symlink()]
    return max(existing, key=lambda p: p.stat().st_size) if existing else None


# Claude Code ----------------------------------------------------------------------------------

_JS_PAIR = re.compile(rb'([A-Z_]+):"([^"\\]*)"')
_JS_FLAG = re.compile(rb"([A-Z_]+):!([01])")
_IDENT = rb"[A-Za-z_$][\w$]*"
# Parameters every OAuth client sends (the OAuth agent adds them itself): not profile data.
_STANDARD_PARAMS = frozenset({"response_type", "code_challenge_method", "client_id", "redirect_uri", "scope", "state"})


def _extract_claude(package_dir: Path, package: str, version: str) -> CliConstants:
    platform_dir = _PLATFORM["claude_code"][1]
    binary = _largest(
        [
            package_dir / "bin" / "claude.exe",
            package_dir / "node_modules" / platform_dir / "claude",
            package_dir.parent.parent / platform_dir / "claude",  # hoisted next to the main package
            package_dir / "cli.js",
        ]
    )
    if binary is None or binary.stat().st_size < 100_000:
        return CliConstants("claude_code", package, version, problems=("the Claude Code executable was not found",))
    problems: list[str] = []
    with _mapped(binary) as data:
        anchor = data.find(b'BASE_API_URL:"https://api.anthropic.com"')
        if anchor < 0:
            return CliConstants(
                "claude_code", package, version, problems=("the OAuth endpoint table (BASE_API_URL) was not found",)
            )
        end = data.find(b"}", anchor)
        table = bytes(data[anchor:end])
        pairs = {k.decode(): v.decode() for k, v in _JS_PAIR.findall(table)}
        flags = {k.decode(): v == b"0" for k, v in _JS_FLAG.findall(table)}  # !0 is true
        window = bytes(data[max(0, anchor - 20_000) : anchor])
        builder = _find_authorize_builder(data)
        scopes: tuple[str, ...] = ()
        redirect = None
        extra: dict[str, str | None] = {}
        if builder is None:
            problems.append("the code that builds the authorize URL was not found")
        else:
            for name, value in re.findall(rb'searchParams\.append\("(\w+)","(\w+)"\)', builder):
                if name.decode() not in _STANDARD_PARAMS:
                    extra[name.decode()] = value.decode()
            port = re.search(rb"`http://localhost:\$\{" + _IDENT + rb"\}(/[\w/]*)`", builder)
            redirect = f"http://localhost:{{port}}{port.group(1).decode()}" if port else None
            if redirect is None:
                problems.append("the loopback redirect form was not found")
            scope_at = rb'\.searchParams\.append\("scope"'
            expr = re.search(rb"let " + _IDENT + rb"=([^;]{1,300});if\(" + _IDENT + scope_at, builder)
            if expr is None:
                problems.append("the scope expression of the authorize URL was not found")
            else:
                default = _split_top(expr.group(1), b":")[-1]  # the ternary's last branch: claude.ai sign-in
                try:
                    scopes = tuple(dict.fromkeys(_JsScopes(window, flags).scope_list(default)))
                except ValueError as exc:
                    problems.append(f"the scope list could not be resolved ({exc})")
    for key in ("CLAUDE_AI_AUTHORIZE_URL", "TOKEN_URL", "CLIENT_ID"):
        if not pairs.get(key):
            problems.append(f"{key} was not found in the OAuth endpoint table")
    return CliConstants(
        "claude_code",
        package,
        version,
        authorize_url=pairs.get("CLAUDE_AI_AUTHORIZE_URL"),
        token_url=pairs.get("TOKEN_URL"),
        client_id=pairs.get("CLIENT_ID"),
        scopes=scopes,
        redirect_uri=redirect,
        extra_authorize_params=extra,
        problems=tuple(problems),
    )


def _find_authorize_builder(data: bytes) -> bytes | None:
    """The minified function that builds the claude.ai authorize URL (it appends ``scope``,
    ``code_challenge_method=S256`` and names ``CLAUDE_AI_AUTHORIZE_URL``)."""
    start = 0
    while True:
        at = data.find(b'.searchParams.append("code","true")', start)
        if at < 0:
            return None
        chunk = bytes(data[max(0, at - 600) : at + 1500])
        if b"CLAUDE_AI_AUTHORIZE_URL" in chunk and b'"code_challenge_method","S256"' in chunk:
            return chunk
        start = at + 1


def _split_top(expr: bytes, sep: bytes) -> list[bytes]:
    """``expr`` split at ``sep`` outside brackets/parentheses/strings."""
    parts: list[bytes] = []
    depth = 0
    quote: int | None = None
    current = bytearray()
    for byte in expr:
        char = bytes([byte])
        if quote is not None:
            current += char
            if byte == quote:
                quote = None
            continue
        if char in (b'"', b"'", b"`"):
            quote = byte
        elif char in (b"(", b"[", b"{"):
            depth += 1
        elif char in (b")", b"]", b"}"):
            depth -= 1
        elif char == sep and depth == 0:
            parts.append(bytes(current).strip())
            current = bytearray()
            continue
        current += char
    parts.append(bytes(current).strip())
    return parts


class _JsScopes:
    """Resolve a minified scope-list expression (``qkr``, ``S5s()``, ``[a,...b]``, ``R([...])``)
    against the definitions near Claude Code's OAuth table. Raises ValueError when it cannot."""

    def __init__(self, text: bytes, flags: dict[str, bool]) -> None:
        self.text = text
        self.flags = flags

    def scope_list(self, expr: bytes, depth: int = 0) -> list[str]:
        value = self.value(expr.strip(), depth)
        if not isinstance(value, list):
            raise ValueError(f"{expr.decode(errors='replace')!r} is not a list")
        return value

    def value(self, expr: bytes, depth: int) -> str | list[str]:
        if depth > 12:
            raise ValueError("too deeply nested")
        if re.fullmatch(rb'"[^"]*"', expr):
            return expr[1:-1].decode()
        if expr.startswith(b"[") and expr.endswith(b"]"):
            items: list[str] = []
            for part in _split_top(expr[1:-1], b","):
                if not part:
                    continue
                if part.startswith(b"..."):
                    items.extend(self.scope_list(part[3:], depth + 1))
                else:
                    item = self.value(part, depth + 1)
                    if not isinstance(item, str):
                        raise ValueError("nested list")
                    items.append(item)
            return items
        call = re.fullmatch(rb"(" + _IDENT + rb")\((.*)\)", expr, re.S)
        if call is not None:
            name, arg = call.groups()
            if arg.strip():  # a wrapper such as a de-duplicating R([...])
                return list(dict.fromkeys(self.scope_list(arg, depth + 1)))
            return self.function(name, depth + 1)
        if re.fullmatch(_IDENT, expr):
            return self.value(self.definition(expr), depth + 1)
        raise ValueError(f"unsupported expression {expr[:60].decode(errors='replace')!r}")

    def definition(self, name: bytes) -> bytes:
        pattern = re.compile(rb"(?<![\w$.])" + re.escape(name) + rb"=(?![=>])")
        matches = list(pattern.finditer(self.text))
        if not matches:
            raise ValueError(f"no definition of {name.decode()}")
        rest = self.text[matches[-1].end() : matches[-1].end() + 2000]  # the one nearest the table
        return _split_top(_split_top(rest, b";")[0], b",")[0]

    def function(self, name: bytes, depth: int) -> list[str]:
        pattern = rb"function " + re.escape(name) + rb"\(\)\{(.{1,400}?)return (" + _IDENT + rb")\}"
        matches = list(re.finditer(pattern, self.text, re.S))
        if not matches:
            raise ValueError(f"no function {name.decode()}")
        body, result = matches[-1].groups()
        lists: dict[bytes, list[str]] = {}
        for statement in _split_top(body, b";"):
            if statement.startswith(b"let "):
                for declarator in _split_top(statement[4:], b","):
                    target, _, inner = declarator.partition(b"=")
                    if re.fullmatch(_IDENT + rb"\(\)", inner):  # e.g. let t=un(): the config object
                        continue
                    lists[target] = self.scope_list(inner, depth + 1)
                continue
            push = re.fullmatch(
                rb"if\(" + _IDENT + rb"(?:\(\))?\.([A-Z_]+)\)(" + _IDENT + rb")\.push\((.+)\)", statement, re.S
            )
            if push:
                flag, target, item = push.groups()
                if flag.decode() not in self.flags:
                    raise ValueError(f"unknown flag {flag.decode()}")
                if self.flags[flag.decode()]:
                    value = self.value(item, depth + 1)
                    lists.setdefault(target, []).extend([value] if isinstance(value, str) else value)
                continue
            if statement:
                raise ValueError(f"unsupported statement in {name.decode()}")
        if result not in lists:
            raise ValueError(f"{name.decode()} returns an unknown list")
        return lists[result]


# Codex ----------------------------------------------------------------------------------------

_CODEX_PARAMS = ("id_token_add_organizations", "codex_cli_simplified_flow", "originator")


def _extract_codex(package_dir: Path, package: str, version: str) -> CliConstants:
    platform_dir = _PLATFORM["codex"][1]
    candidates = [
        *package_dir.glob(f"node_modules/{platform_dir}/vendor/*linux*/bin/codex"),
        *package_dir.parent.parent.glob(f"{platform_dir}/vendor/*linux*/bin/codex"),
        *package_dir.glob("vendor/*linux*/bin/codex"),
    ]
    binary = _largest(list(candidates))
    if binary is None:
        return CliConstants("codex", package, version, problems=("the Codex executable was not found",))
    problems: list[str] = []
    extra: dict[str, str | None] = {}
    with _mapped(binary) as data:
        found = re.search(rb"https://auth\.openai\.com/oauth/token", data)
        token = found.group(0).decode() if found else None
        issuer = data.find(b"https://auth.openai.com") >= 0
        authorize_path = data.find(b"/oauth/authorize") >= 0
        ids = [m.group(0).decode() for m in re.finditer(rb"app_[A-Za-z0-9]{24}", data)]
        ids = [i for i in ids if re.search(r"\d", i[4:]) and re.search(r"[A-Z]", i[4:]) and re.search(r"[a-z]", i[4:])]
        found = re.search(rb"openid profile email offline_access(?: [a-z_]+(?:\.[a-z_]+)+)*", data)
        scope = found.group(0).decode() if found else None
        redirect = data.find(b"/auth/callback") >= 0
        near = bytes(data[max(0, found.start() - 400) : found.start()]) if found else b""
        for name in _CODEX_PARAMS[:2]:
            if name.encode() in near:
                extra[name] = None  # present; the value ("true") is not a string in the binary
        if data.find(b"codex_cli_rscodex-tui") >= 0 or data.find(b"codex_cli_rs") >= 0:
            extra["originator"] = "codex_cli_rs"
    distinct = sorted(set(ids))
    if len(distinct) != 1:
        problems.append(f"the client id was not found unambiguously ({len(distinct)} candidates)")
    if token is None:
        problems.append("the token URL was not found")
    if not (issuer and authorize_path):
        problems.append("the authorize URL (issuer + /oauth/authorize) was not found")
    if scope is None:
        problems.append("the scope string was not found")
    if not redirect:
        problems.append("the /auth/callback redirect path was not found")
    for name in _CODEX_PARAMS:
        if name not in extra:
            problems.append(f"the authorize parameter {name} was not found")
    return CliConstants(
        "codex",
        package,
        version,
        authorize_url="https://auth.openai.com/oauth/authorize" if issuer and authorize_path else None,
        token_url=token,
        client_id=distinct[0] if len(distinct) == 1 else None,
        scopes=tuple(scope.split()) if scope else (),
        # The port (1455) is a number in the binary, not a string: the path is what is checked.
        redirect_uri="http://localhost:1455/auth/callback" if redirect else None,
        extra_authorize_params=extra,
        problems=tuple(problems),
    )


# Gemini CLI -----------------------------------------------------------------------------------


def _extract_gemini(package_dir: Path, package: str, version: str) -> CliConstants:
    found: dict[str, set[str]] = {
        "client_id": set(),
        "client_secret": set(),
        "scopes": set(),
        "authorize_url": set(),
        "token_url": set(),
        "redirect": set(),
        "access_type": set(),
    }
    files = sorted((package_dir / "bundle").glob("*.js")) or sorted(package_dir.rglob("oauth2.js"))
    for path in files:
        text = path.read_text("utf-8", errors="replace")
        if "OAUTH_CLIENT_ID" not in text:
            continue
        for key, pattern in (
            ("client_id", r'\bOAUTH_CLIENT_ID = "([^"]+)"'),
            ("client_secret", r'\bOAUTH_CLIENT_SECRET = "([^"]+)"'),
            ("authorize_url", r'oauth2AuthBaseUrl: "([^"]+)"'),
            ("token_url", r'oauth2TokenUrl: "([^"]+)"'),
            ("redirect", r"redirectUri = `(http://127\.0\.0\.1:)\$\{port\}(/[\w/]+)`"),
        ):
            for match in re.finditer(pattern, text):
                found[key].add("".join(match.groups()) if key == "redirect" else match.group(1))
        for match in re.finditer(r"\bOAUTH_SCOPE = \[([^\]]*)\]", text):
            found["scopes"].add(" ".join(re.findall(r'"([^"]+)"', match.group(1))))
        web = re.search(r"async function authWithWeb\(client\) \{(.{0,800}?)state\s*\}\);", text, re.S)
        if web:
            for value in re.findall(r'access_type: "(\w+)"', web.group(1)):
                found["access_type"].add(value)
    problems: list[str] = []

    def one(key: str, what: str) -> str | None:
        values = found[key]
        if len(values) == 1:
            return next(iter(values))
        problems.append(f"{what} was {'not found' if not values else 'found with different values'}")
        return None

    client_id = one("client_id", "OAUTH_CLIENT_ID")
    secret = one("client_secret", "OAUTH_CLIENT_SECRET")
    scopes = one("scopes", "OAUTH_SCOPE")
    authorize = one("authorize_url", "the authorize URL (oauth2AuthBaseUrl)")
    token = one("token_url", "the token URL (oauth2TokenUrl)")
    redirect = one("redirect", "the loopback redirect of the web sign-in")
    access_type = one("access_type", "access_type of the web sign-in")
    return CliConstants(
        "gemini",
        package,
        version,
        authorize_url=authorize,
        token_url=token,
        client_id=client_id,
        client_secret_sha256=secret_digest(secret),
        scopes=tuple(scopes.split()) if scopes else (),
        redirect_uri=redirect.replace("127.0.0.1:", "127.0.0.1:{port}") if redirect else None,
        extra_authorize_params={"access_type": access_type} if access_type else {},
        problems=tuple(problems),
    )


# -- npm registry: versions and tarballs ----------------------------------------------------------


class NpmError(RuntimeError):
    """npm is missing or the registry could not be asked (message says which, in words)."""


def _npm() -> str:
    npm = shutil.which("npm")
    if npm is None:
        raise NpmError("npm is not installed (Debian package npm)")
    return npm


def _npm_json(args: list[str], timeout: float = 120) -> Any:
    result = subprocess.run(
        [_npm(), *args, "--json"],
        capture_output=True,
        timeout=timeout,
        check=False,
        env=_npm_env(),
    )
    if result.returncode != 0:
        raise NpmError(f"npm {' '.join(args)} failed: {result.stderr.decode(errors='replace').strip()[-300:]}")
    try:
        return json.loads(result.stdout or b"null")
    except ValueError as exc:
        raise NpmError(f"npm {' '.join(args)} did not answer JSON") from exc


def _npm_env() -> dict[str, str]:
    import os

    env = dict(os.environ)
    env["npm_config_update_notifier"] = "false"
    env["npm_config_fund"] = "false"
    env["npm_config_audit"] = "false"
    return env


def npm_latest_version(package: str) -> str:
    """The version the registry's ``latest`` tag points at."""
    version = _npm_json(["view", f"{package}@latest", "version"])
    if isinstance(version, list):
        version = version[-1] if version else None
    if not isinstance(version, str):
        raise NpmError(f"the registry has no latest version of {package}")
    return version


def npm_versions(package: str) -> list[str]:
    """Every published version of ``package``, oldest first (as the registry lists them)."""
    versions = _npm_json(["view", package, "versions"])
    if isinstance(versions, str):
        versions = [versions]
    if not isinstance(versions, list):
        raise NpmError(f"the registry lists no versions of {package}")
    return [str(v) for v in versions]


def fetch_packages(versions: dict[str, str], cache_dir: Path) -> Path:
    """A ``node_modules`` directory holding the CLIs at ``versions`` (profile name -> version),
    from ``npm pack`` tarballs (with the linux-x64 platform packages), cached under ``cache_dir``.

    Downloads only what is not cached yet; returns ``cache_dir/node_modules``.
    """
    node_modules = cache_dir / "node_modules"
    for provider, version in versions.items():
        package = CLI_PACKAGES[provider]
        target = node_modules / package
        marker = target / ".remotecli-unpacked"
        if marker.is_file() and marker.read_text().strip() == version:
            continue
        if target.exists():
            shutil.rmtree(target)
        specs = [(f"{package}@{version}", target)]
        if provider in _PLATFORM:
            spec, directory = _PLATFORM[provider]
            specs.append((spec.format(version=version), target / "node_modules" / directory))
        cache_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=cache_dir, prefix=".pack-") as tmp:
            for spec, destination in specs:
                packed = _npm_json(["pack", spec, "--pack-destination", tmp], timeout=900)
                if not isinstance(packed, list) or not packed or not isinstance(packed[0], dict):
                    raise NpmError(f"npm pack {spec} did not name a tarball")
                _unpack(Path(tmp) / str(packed[0]["filename"]), destination)
        marker.write_text(version + "\n")
    return node_modules


def _unpack(tarball: Path, destination: Path) -> None:
    """Extract an npm tarball's ``package/`` directory into ``destination``."""
    destination.mkdir(parents=True, exist_ok=True)
    with tarfile.open(tarball, "r:gz") as archive:
        members = []
        for member in archive.getmembers():
            name = member.name.split("/", 1)[1] if "/" in member.name else ""
            if not name or not (member.isfile() or member.isdir()):
                continue
            member.name = name
            members.append(member)
        archive.extractall(destination, members=members, filter="data")
    tarball.unlink()
