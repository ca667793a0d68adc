"""vms.pool, vms.pool_ready_at and a nullable vms.user_id: Browser VMs of the warm pool belong to no user until a
sign-in claims them (issue 13, ADR 0012)

Revision ID: 0009
Revises: 0008
"""

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None

LIVE_CLI_VM_WHERE = "vm_type = 'cli' AND status NOT IN ('failed', 'destroying', 'destroyed')"


def upgrade() -> None:
    # On SQLite the batch rebuilds the table; the partial unique index is dropped first and
    # created again after, exactly as before (the rebuild would not carry its WHERE clause).
    op.drop_index("uq_vms_one_live_cli_per_user", table_name="vms")
    with op.batch_alter_table("vms", schema=None) as batch_op:
        batch_op.alter_column("user_id", existing_type=sa.String(length=36), nullable=True)
        batch_op.add_column(sa.Column("pool", sa.Boolean(), nullable=False, server_default=sa.false()))
        batch_op.add_column(sa.Column("pool_ready_at", sa.DateTime(timezone=True), nullable=True))
    op.create_index(
        "uq_vms_one_live_cli_per_user",
        "vms",
        ["user_id"],
        unique=True,
        sqlite_where=sa.text(LIVE_CLI_VM_WHERE),
        postgresql_where=sa.text(LIVE_CLI_VM_WHERE),
    )


def downgrade() -> None:
    # Pool VMs that nobody claimed have no user: they go (the reconciler removes their processes).
    op.execute("DELETE FROM vms WHERE user_id IS NULL")
    op.drop_index("uq_vms_one_live_cli_per_user", table_name="vms")
    with op.batch_alter_table("vms", schema=None) as batch_op:
        batch_op.drop_column("pool_ready_at")
        batch_op.drop_column("pool")
        batch_op.alter_column("user_id", existing_type=sa.String(length=36), nullable=False)
    op.create_index(
        "uq_vms_one_live_cli_per_user",
        "vms",
        ["user_id"],
        unique=True,
        sqlite_where=sa.text(LIVE_CLI_VM_WHERE),
        postgresql_where=sa.text(LIVE_CLI_VM_WHERE),
    )
