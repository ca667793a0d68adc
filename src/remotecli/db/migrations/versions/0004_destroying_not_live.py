"""A VM being destroyed is not its user's live CLI VM

The partial unique index "one live CLI VM per user" counted 'destroying', so garbage-collecting a
failed CLI VM (failed -> destroying -> destroyed) violated it whenever the user already had a new
CLI VM, which is the normal case.

Revision ID: 0004
Revises: 0003
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

OLD_WHERE = "vm_type = 'cli' AND status NOT IN ('failed', 'destroyed')"
NEW_WHERE = "vm_type = 'cli' AND status NOT IN ('failed', 'destroying', 'destroyed')"


def _recreate(where: str) -> None:
    with op.batch_alter_table("vms", schema=None) as batch_op:
        batch_op.drop_index("uq_vms_one_live_cli_per_user")
        batch_op.create_index("uq_vms_one_live_cli_per_user", ["user_id"], unique=True,
                              sqlite_where=sa.text(where), postgresql_where=sa.text(where))


def upgrade() -> None:
    _recreate(NEW_WHERE)


def downgrade() -> None:
    _recreate(OLD_WHERE)
