"""volumes: one home volume per user, attached to at most one VM; vms.last_active_at for idle stop (ADR 0011)

Revision ID: 0007
Revises: 0006
"""

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

LIVE_VOLUME_WHERE = "status NOT IN ('deleting', 'deleted')"


def upgrade() -> None:
    op.create_table(
        "volumes",
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("user_id", sa.String(length=36), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("status_reason", sa.Text(), nullable=True),
        sa.Column("size_bytes", sa.BigInteger(), nullable=False),
        sa.Column("attached_vm_id", sa.String(length=64), nullable=True),
        sa.Column("driver", sa.String(length=32), nullable=False),
        sa.Column("location", sa.Text(), nullable=False),
        sa.Column("generation", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("status_changed_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("attached_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_volumes")),
        sa.UniqueConstraint("attached_vm_id", name=op.f("uq_volumes_attached_vm_id")),
    )
    op.create_index(
        "uq_volumes_one_live_per_user",
        "volumes",
        ["user_id"],
        unique=True,
        sqlite_where=sa.text(LIVE_VOLUME_WHERE),
        postgresql_where=sa.text(LIVE_VOLUME_WHERE),
    )
    op.create_index("ix_volumes_status", "volumes", ["status"], unique=False)
    op.add_column("vms", sa.Column("last_active_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("vms") as batch:
        batch.drop_column("last_active_at")
    op.drop_index("ix_volumes_status", table_name="volumes")
    op.drop_index("uq_volumes_one_live_per_user", table_name="volumes")
    op.drop_table("volumes")
