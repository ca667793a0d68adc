"""reconciler: per-VM leases and UNKNOWN strikes, host orphans seen

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-25 10:00:00.000000
"""
import sqlalchemy as sa
from alembic import op

revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('host_orphans',
    sa.Column('vm_id', sa.String(length=255), nullable=False),
    sa.Column('directory', sa.Text(), nullable=True),
    sa.Column('pid', sa.Integer(), nullable=True),
    sa.Column('ports', sa.JSON(), nullable=True),
    sa.Column('first_seen_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('last_seen_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('lease_owner', sa.String(length=64), nullable=True),
    sa.Column('lease_expires_at', sa.DateTime(timezone=True), nullable=True),
    sa.PrimaryKeyConstraint('vm_id', name=op.f('pk_host_orphans'))
    )
    with op.batch_alter_table('vms', schema=None) as batch_op:
        batch_op.add_column(sa.Column('lease_owner', sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column('lease_expires_at', sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column('unknown_strikes', sa.Integer(), server_default='0', nullable=False))


def downgrade() -> None:
    with op.batch_alter_table('vms', schema=None) as batch_op:
        batch_op.drop_column('unknown_strikes')
        batch_op.drop_column('lease_expires_at')
        batch_op.drop_column('lease_owner')
    op.drop_table('host_orphans')
