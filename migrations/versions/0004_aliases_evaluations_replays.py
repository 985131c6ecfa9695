"""aliases, evaluations and replays (DESIGN §3.2)

Chain: 0001 -> 0002 (upload sessions) -> 0003 (folder manifests) -> 0004; down_revision is the
newest of those present on main (re-pointed when they land).

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01 13:46:55.035637
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('aliases',
    sa.Column('id', sa.String(length=32), nullable=False),
    sa.Column('stream_id', sa.String(length=32), nullable=False),
    sa.Column('name', sa.String(length=64), nullable=False),
    sa.Column('version_id', sa.String(length=32), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['stream_id'], ['streams.id'], name=op.f('fk_aliases_stream_id_streams'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['version_id'], ['versions.id'], name=op.f('fk_aliases_version_id_versions')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_aliases')),
    sa.UniqueConstraint('stream_id', 'name', name=op.f('uq_aliases_stream_id_name'))
    )
    with op.batch_alter_table('aliases', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_aliases_stream_id'), ['stream_id'], unique=False)

    op.create_table('evaluations',
    sa.Column('id', sa.String(length=32), nullable=False),
    sa.Column('version_id', sa.String(length=32), nullable=False),
    sa.Column('evaluator', sa.String(length=200), nullable=False),
    sa.Column('params', sa.JSON(), nullable=True),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('metrics', sa.JSON(), nullable=True),
    sa.Column('error', sa.Text(), nullable=True),
    sa.Column('attempts', sa.Integer(), nullable=False),
    sa.Column('lease_owner', sa.String(length=64), nullable=True),
    sa.Column('lease_expires_at', sa.Float(), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('finished_at', sa.DateTime(timezone=True), nullable=True),
    sa.ForeignKeyConstraint(['version_id'], ['versions.id'], name=op.f('fk_evaluations_version_id_versions'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_evaluations'))
    )
    with op.batch_alter_table('evaluations', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_evaluations_status'), ['status'], unique=False)
        batch_op.create_index(batch_op.f('ix_evaluations_version_id'), ['version_id'], unique=False)

    op.create_table('alias_moves',
    sa.Column('id', sa.String(length=32), nullable=False),
    sa.Column('alias_id', sa.String(length=32), nullable=False),
    sa.Column('from_version_id', sa.String(length=32), nullable=True),
    sa.Column('to_version_id', sa.String(length=32), nullable=False),
    sa.Column('who', sa.String(length=200), nullable=False),
    sa.Column('at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['alias_id'], ['aliases.id'], name=op.f('fk_alias_moves_alias_id_aliases'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['from_version_id'], ['versions.id'], name=op.f('fk_alias_moves_from_version_id_versions')),
    sa.ForeignKeyConstraint(['to_version_id'], ['versions.id'], name=op.f('fk_alias_moves_to_version_id_versions')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_alias_moves'))
    )
    with op.batch_alter_table('alias_moves', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_alias_moves_alias_id'), ['alias_id'], unique=False)

    with op.batch_alter_table('experts', schema=None) as batch_op:
        batch_op.add_column(sa.Column('source_expert_id', sa.String(length=32), nullable=True))
        batch_op.alter_column('object_key',
               existing_type=sa.VARCHAR(length=400),
               nullable=True)
        batch_op.create_index(batch_op.f('ix_experts_source_expert_id'), ['source_expert_id'], unique=False)
        batch_op.create_foreign_key(batch_op.f('fk_experts_source_expert_id_experts'), 'experts', ['source_expert_id'], ['id'])

    with op.batch_alter_table('streams', schema=None) as batch_op:
        batch_op.add_column(sa.Column('replay_of', sa.String(length=32), nullable=True))
        batch_op.add_column(sa.Column('follows_source', sa.Boolean(), nullable=False, server_default=sa.false()))
        batch_op.add_column(sa.Column('evaluator', sa.JSON(), nullable=True))
        batch_op.add_column(sa.Column('champion', sa.JSON(), nullable=True))
        batch_op.create_index(batch_op.f('ix_streams_replay_of'), ['replay_of'], unique=False)
        batch_op.create_foreign_key(
            batch_op.f('fk_streams_replay_of_streams'), 'streams', ['replay_of'], ['id'], ondelete='CASCADE'
        )



def downgrade() -> None:
    with op.batch_alter_table('streams', schema=None) as batch_op:
        batch_op.drop_constraint(batch_op.f('fk_streams_replay_of_streams'), type_='foreignkey')
        batch_op.drop_index(batch_op.f('ix_streams_replay_of'))
        batch_op.drop_column('champion')
        batch_op.drop_column('evaluator')
        batch_op.drop_column('follows_source')
        batch_op.drop_column('replay_of')

    with op.batch_alter_table('experts', schema=None) as batch_op:
        batch_op.drop_constraint(batch_op.f('fk_experts_source_expert_id_experts'), type_='foreignkey')
        batch_op.drop_index(batch_op.f('ix_experts_source_expert_id'))
        batch_op.alter_column('object_key',
               existing_type=sa.VARCHAR(length=400),
               nullable=False)
        batch_op.drop_column('source_expert_id')

    with op.batch_alter_table('alias_moves', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_alias_moves_alias_id'))

    op.drop_table('alias_moves')
    with op.batch_alter_table('evaluations', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_evaluations_version_id'))
        batch_op.drop_index(batch_op.f('ix_evaluations_status'))

    op.drop_table('evaluations')
    with op.batch_alter_table('aliases', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_aliases_stream_id'))

    op.drop_table('aliases')
