"""SQLAlchemy models. Column sets follow DESIGN.md ("Records and states").

Timestamps are stored as UTC; ``UtcDateTime`` hands back timezone-aware values on SQLite too.
The rule "one live CLI VM per user" is the partial unique index ``uq_vms_one_live_cli_per_user``:
the database, not the application, refuses a second one.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

# Migration 0004: 'destroying' is not live either (a failed VM's garbage collection passes through it
# while the user already has a new CLI VM).
LIVE_CLI_VM_WHERE = "vm_type = 'cli' AND status NOT IN ('failed', 'destroying', 'destroyed')"
# Migration 0007: one home volume per user (a deleted one's row stays for the timeline).
LIVE_VOLUME_WHERE = "status NOT IN ('deleting', 'deleted')"


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class UtcDateTime(TypeDecorator[dt.datetime]):
    """A timezone-aware UTC datetime on every backend."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: dt.datetime | None, dialect: Dialect) -> dt.datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        value = value.astimezone(dt.UTC)
        if dialect.name == "sqlite":
            return value.replace(tzinfo=None)
        return value

    def process_result_value(self, value: dt.datetime | None, dialect: Dialect) -> dt.datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=dt.UTC)
        return value.astimezone(dt.UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class User(Base):
    __tablename__ = "users"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    is_admin: Mapped[bool] = mapped_column(Boolean, default=False)
    password_hash: Mapped[str | None] = mapped_column(String(255), nullable=True)
    disabled: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[dt.datetime] = mapped_column(UtcDateTime, default=utcnow)


class UserIdentity(Base):
    """A user's account at an OpenID Connect provider (migration 0005): single sign-on finds the user by
    (issuer, subject), never by email or name, so a local account and an SSO identity are merged only
    when an operator links them (``remotecli users link-sso``)."""

    __tablename__ = "user_identities"
    __table_args__ = (UniqueConstraint("issuer", "subject", name="uq_user_identities_issuer_subject"),)

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    user_id: Mapped[str] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    issuer: Mapped[str] = mapped_column(String(512))
    subject: Mapped[str] = mapped_column(String(255))
    # The provider's email claim at the last sign-in: shown to admins, never used to find the user.
    email: Mapped[str | None] = mapped_column(String(320), nullable=True)
    created_at: Mapped[dt.datetime] = mapped_column(UtcDateTime, default=utcnow)
    last_login_at: Mapped[dt.datetime | None] = mapped_column(UtcDateTime, nullable=True)


class ApiToken(Base):
    __tablename__ = "api_tokens"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    user_id: Mapped[str] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(64), default="")
    # sha256 of the token: tokens carry 256 bits of randomness, so a fast hash is enough.
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    prefix: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[dt.datetime] = mapped_column(UtcDateTime, default=utcnow)
    expires_at: Mapped[dt.datetime | None] = mapped_column(UtcDateTime, nullable=True)
    revoked_at: Mapped[dt.datetime | None] = mapped_column(UtcDateTime, nullable=True)
    last_used_at: Mapped[dt.datetime | None] = mapped_column(UtcDateTime, nullable=True)


class Vm(Base):
    __tablename__ = "vms"
    __table_args__ = (
        Index(
            "uq_vms_one_live_cli_per_user",
            "user_id",
            unique=True,
            sqlite_where=text(LIVE_CLI_VM_WHERE),
            postgresql_where=text(LIVE_CLI_VM_WHERE),
        ),
        Index("ix_vms_status", "status"),
        Index("ix_vms_user_id_vm_type", "user_id", "vm_type"),
    )

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    # Migration 0009: NULL for a Browser VM of the warm pool that no sign-in has claimed yet.
    user_id: Mapped[str | None] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), nullable=True)
    vm_type: Mapped[str] = mapped_column(String(16))
    status: Mapped[str] = mapped_column(String(16))
    status_reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    driver: Mapped[str] = mapped_column(String(32))
    vcpus: Mapped[int] = mapped_column(Integer)
    memory_mib: Mapped[int] = mapped_column(Integer)
    directory: Mapped[str] = mapped_column(Text)
    endpoint: Mapped[str | None] = mapped_column(Text, nullable=True)
    # Encrypted (AES-GCM) per-VM secret for its guest agent.
    agent_secret_enc: Mapped[bytes] = mapped_column(LargeBinary)
    image_hash: Mapped[str | None] = mapped_column(String(64), nullable=True)
    # Bumped by every status change: a cheap version number for conditional updates.
    generation: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[dt.datetime] = mapped_column(UtcDateTime, default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(UtcDateTime, default=utcnow)
    status_changed_at: Mapped[dt.datetime] = mapped_column(UtcDateTime, default=utcnow)
    last_seen_at: Mapped[dt.datetime | None] = mapped_column(UtcDateTime, nullable=True)
    expires_at: Mapped[dt.datetime | None] = mapped_column(UtcDateTime, nullable=True)
    # Migration 0003: the reconciler's per-VM lease (several controllers on one database) and how
    # many passes in a row the driver could not tell whether the VM is alive.
    lease_owner: Mapped[str | None] = mapped_column(String(64), nullable=True)
    lease_expires_at: Mapped[dt.datetime | None] = mapped_column(UtcDateTime, nullable=True)
    unknown_strikes: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    # Migration 0007: the last use (ensure, exec, an open terminal, a sign-in's delivery); a running
    # CLI VM unused for ``cli_vm_idle_stop_s`` is stopped by the reconciler, its home kept.
    last_active_at: Mapped[dt.datetime | None] = mapped_column(UtcDateTime, nullable=True)
    # Migration 0010: the Incus cluster member the VM's instance is on (None for local drivers).
    member: Mapped[str | None] = mapped_column(String(128), nullable=True)
    # Migration 0009: booted by the warm pool (services/pool.py). It stays true after a sign-in
    # claimed it (``user_id`` set): the VM serves that one session and is destroyed after it.
    pool: Mapped[bool] = mapped_column(Boolean, default=False, server_default=text("false"))
    # When its Chromium was up on a blank page: only a ready pool VM is claimed.
    pool_ready_at: Mapped[dt.datetime | None] = mapped_column(UtcDateTime, nullable=True)


class Volume(Base):
    """A user's home volume (migration 0007; ADR 0011): attached to at most one VM at a time.

    ``attached_vm_id`` is unique (the database refuses a second attachment) and has no foreign key:
    the VM row may be garbage-collected while the volume still names it, until the reconciler has
    proven that VM dead and detached it. ``user_id`` has no foreign key either: deleting a user
    keeps the home unless the operator purges it, and such a volume is an orphan for ``gc``.
    """

    __tablename__ = "volumes"
    __table_args__ = (
        Index(
            "uq_volumes_one_live_per_user",
            "user_id",
            unique=True,
            sqlite_where=text(LIVE_VOLUME_WHERE),
            postgresql_where=text(LIVE_VOLUME_WHERE),
        ),
        Index("ix_volumes_status", "status"),
    )

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    user_id: Mapped[str] = mapped_column(String(36))
    status: Mapped[str] = mapped_column(String(16))
    status_reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    attached_vm_id: Mapped[str | None] = mapped_column(String(64), nullable=True, unique=True)
    driver: Mapped[str] = mapped_column(String(32))
    # Where the driver keeps it: for the QEMU, Firecracker and fake drivers a file path on the host.
    location: Mapped[str] = mapped_column(Text)
    generation: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[dt.datetime] = mapped_column(UtcDateTime, default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(UtcDateTime, default=utcnow)
    status_changed_at: Mapped[dt.datetime] = mapped_column(UtcDateTime, default=utcnow)
    attached_at: Mapped[dt.datetime | None] = mapped_column(UtcDateTime, nullable=True)
    # Migration 0008: who is making the volume while it is ``creating`` (``background.leases``);
    # a lease its holder stopped renewing lapses and the next ensure or reconciler pass takes over.
    lease_owner: Mapped[str | None] = mapped_column(String(64), nullable=True)
    lease_expires_at: Mapped[dt.datetime | None] = mapped_column(UtcDateTime, nullable=True)


class HostOrphan(Base):
    """A VM found on the host (process, directory, ports) that no row owns: removed after a grace period.

    Shared by all controllers: ``first_seen_at`` starts the grace period once, the lease makes one
    controller remove it.
    """

    __tablename__ = "host_orphans"

    vm_id: Mapped[str] = mapped_column(String(255), primary_key=True)
    directory: Mapped[str | None] = mapped_column(Text, nullable=True)
    pid: Mapped[int | None] = mapped_column(Integer, nullable=True)
    ports: Mapped[list[int] | None] = mapped_column(JSON, nullable=True)
    first_seen_at: Mapped[dt.datetime] = mapped_column(UtcDateTime)
    last_seen_at: Mapped[dt.datetime] = mapped_column(UtcDateTime)
    lease_owner: Mapped[str | None] = mapped_column(String(64), nullable=True)
    lease_expires_at: Mapped[dt.datetime | None] = mapped_column(UtcDateTime, nullable=True)


class AuthSession(Base):
    __tablename__ = "auth_sessions"
    __table_args__ = (Index("ix_auth_sessions_user_id_status", "user_id", "status"),)

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    user_id: Mapped[str] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    provider: Mapped[str] = mapped_column(String(64))
    status: Mapped[str] = mapped_column(String(16))
    message: Mapped[str | None] = mapped_column(Text, nullable=True)
    error_code: Mapped[str | None] = mapped_column(String(64), nullable=True)
    error_message: Mapped[str | None] = mapped_column(Text, nullable=True)
    cli_vm_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    browser_vm_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    generation: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[dt.datetime] = mapped_column(UtcDateTime, default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(UtcDateTime, default=utcnow)
    expires_at: Mapped[dt.datetime | None] = mapped_column(UtcDateTime, nullable=True)
    # Migration 0002: the flow's progress, the held credential, and the worker's lease.
    oauth_flow_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    # AES-GCM ciphertext of the token response, held only until delivered and read back.
    credential_enc: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)
    # What the dashboard may show: provider account, expiry, scopes. Never a token.
    credential_meta: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    delivered_at: Mapped[dt.datetime | None] = mapped_column(UtcDateTime, nullable=True)
    lease_owner: Mapped[str | None] = mapped_column(String(64), nullable=True)
    lease_expires_at: Mapped[dt.datetime | None] = mapped_column(UtcDateTime, nullable=True)


class WsTicket(Base):
    """One-time, short-lived tickets that open a websocket (VNC view, terminal) for one user."""

    __tablename__ = "ws_tickets"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    kind: Mapped[str] = mapped_column(String(16))  # "vnc" | "terminal"
    user_id: Mapped[str] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    subject_id: Mapped[str] = mapped_column(String(64))  # auth session id or VM id
    created_at: Mapped[dt.datetime] = mapped_column(UtcDateTime, default=utcnow)
    expires_at: Mapped[dt.datetime] = mapped_column(UtcDateTime)
    used_at: Mapped[dt.datetime | None] = mapped_column(UtcDateTime, nullable=True)


class Event(Base):
    """Append-only timeline. No foreign keys: events outlive the rows they describe."""

    __tablename__ = "events"
    __table_args__ = (
        Index("ix_events_vm_id", "vm_id"),
        Index("ix_events_session_id", "session_id"),
        Index("ix_events_user_id", "user_id"),
    )

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True)
    at: Mapped[dt.datetime] = mapped_column(UtcDateTime, default=utcnow)
    module: Mapped[str] = mapped_column(String(32))
    kind: Mapped[str] = mapped_column(String(64))
    user_id: Mapped[str | None] = mapped_column(String(36), nullable=True)
    vm_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    session_id: Mapped[str | None] = mapped_column(String(36), nullable=True)
    from_status: Mapped[str | None] = mapped_column(String(16), nullable=True)
    to_status: Mapped[str | None] = mapped_column(String(16), nullable=True)
    message: Mapped[str] = mapped_column(Text, default="")
    details: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)


class LoginFailure(Base):
    """One failed password sign-in, counted per account and per address (services/login_limits.py)."""

    __tablename__ = "login_failures"
    __table_args__ = (Index("ix_login_failures_key_at", "key", "at"),)

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True)
    key: Mapped[str] = mapped_column(String(280))  # "account:<name>" or "address:<ip>"
    at: Mapped[dt.datetime] = mapped_column(UtcDateTime, default=utcnow)
