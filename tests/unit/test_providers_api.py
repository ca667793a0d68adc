"""GET /api/v1/providers: each profile with the OAuth constants of the CLI in the cli image and
every difference from them (drift, operator override), never a client secret."""

from __future__ import annotations

import json

from fastapi.testclient import TestClient

from remotecli.app import create_app
from remotecli.context import AppContext
from remotecli.images import hashing
from remotecli.images.builder import image_dir
from remotecli.images.cli_constants import CLI_PACKAGES, CliConstants, secret_digest
from remotecli.images.recipes import CLI
from remotecli.services import users as users_service
from remotecli.services.provider_drift import builtin_profiles


def _record_cli_image(ctx: AppContext, **codex_changes: object) -> None:
    """A cli image manifest for the current recipe whose CLIs agree with the built-in profiles."""
    recorded = {}
    for name, profile in builtin_profiles(ctx.settings).items():
        doc = CliConstants(
            provider=name, package=CLI_PACKAGES[name], version="1.0.0", authorize_url=profile.authorize_url,
            token_url=profile.token_url, client_id=profile.client_id,
            client_secret_sha256=secret_digest(profile.client_secret), scopes=profile.scopes,
            redirect_uri=profile.redirect_uri, extra_authorize_params=dict(profile.extra_authorize_params),
        ).as_dict()
        if name == "codex":
            doc.update(codex_changes)
        recorded[name] = doc
    directory = image_dir(ctx.settings, "cli", hashing.image_hash(CLI))
    directory.mkdir(parents=True)
    (directory / "manifest.json").write_text(json.dumps({"kind": "rootfs", "cli_constants": recorded}))


def test_providers_show_the_cli_constants_and_differences(ctx: AppContext) -> None:
    _record_cli_image(ctx, token_url="https://auth.example/new/token")
    user = users_service.create_user(ctx.db, "alice")
    _, token = users_service.create_token(ctx.db, user)
    with TestClient(create_app(ctx, background=False)) as client:
        items = {p["name"]: p for p in client.get("/api/v1/providers",
                                                   headers={"Authorization": f"Bearer {token}"}).json()["items"]}
    claude, codex, gemini = items["claude_code"], items["codex"], items["gemini"]
    assert claude["cli"]["package"] == "@anthropic-ai/claude-code" and claude["cli"]["version"] == "1.0.0"
    assert claude["cli"]["token_url"] == "https://platform.claude.com/v1/oauth/token"
    assert claude["differences"] == []
    (drift,) = codex["differences"]
    assert drift["kind"] == "drift" and drift["field"] == "token_url"
    assert "https://auth.example/new/token" in drift["message"]
    text = json.dumps(items)
    assert "client_secret" not in text and "GOCSPX" not in text and "sha256:" not in text
    assert gemini["credential_files"] == [".gemini/oauth_creds.json", ".gemini/settings.json"]


def test_providers_without_a_built_cli_image(ctx: AppContext) -> None:
    user = users_service.create_user(ctx.db, "alice")
    _, token = users_service.create_token(ctx.db, user)
    with TestClient(create_app(ctx, background=False)) as client:
        items = client.get("/api/v1/providers", headers={"Authorization": f"Bearer {token}"}).json()["items"]
    assert all(item["cli"] is None and item["differences"] == [] for item in items)
