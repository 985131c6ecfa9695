"""sharded folds: the parts of a fold split over workers, the reduction's outcome, a stream's part count

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('fold_parts',
    sa.Column('id', sa.String(length=32), nullable=False),
    sa.Column('version_id', sa.String(length=32), nullable=False),
    sa.Column('phase', sa.String(length=16), nullable=False),
    sa.Column('index', sa.Integer(), nullable=False),
    sa.Column('spec', sa.JSON(), nullable=False),
    sa.Column('object_key', sa.String(length=400), nullable=False),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('attempts', sa.Integer(), nullable=False),
    sa.Column('lease_owner', sa.String(length=64), nullable=True),
    sa.Column('lease_expires_at', sa.Float(), nullable=True),
    sa.Column('partial', sa.JSON(), nullable=True),
    sa.Column('sha256', sa.String(length=64), nullable=True),
    sa.Column('size', sa.BigInteger(), nullable=True),
    sa.Column('seconds', sa.Float(), nullable=True),
    sa.Column('worker', sa.String(length=64), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('finished_at', sa.DateTime(timezone=True), nullable=True),
    sa.ForeignKeyConstraint(['version_id'], ['versions.id'], name=op.f('fk_fold_parts_version_id_versions'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_fold_parts')),
    sa.UniqueConstraint('version_id', 'phase', 'index', name=op.f('uq_fold_parts_version_id_phase_index'))
    )
    with op.batch_alter_table('fold_parts') as batch:
        batch.create_index(batch.f('ix_fold_parts_version_id'), ['version_id'], unique=False)
    with op.batch_alter_table('versions') as batch:
        batch.add_column(sa.Column('fold_outcome', sa.JSON(), nullable=True))
    with op.batch_alter_table('streams') as batch:
        batch.add_column(sa.Column('fold_parts', sa.Integer(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('streams') as batch:
        batch.drop_column('fold_parts')
    with op.batch_alter_table('versions') as batch:
        batch.drop_column('fold_outcome')
    with op.batch_alter_table('fold_parts') as batch:
        batch.drop_index(batch.f('ix_fold_parts_version_id'))
    op.drop_table('fold_parts')
