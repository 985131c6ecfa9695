"""folder checkpoints: the manifest of files of a base, an expert and a version (DESIGN §3.1)

A null manifest is a single .safetensors object at the row's key; a manifest lists the folder's
files as [path, size, sha256], stored under the key without ".safetensors" plus "/path".

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('streams') as batch:
        batch.add_column(sa.Column('base_files', sa.JSON(), nullable=True))
    with op.batch_alter_table('experts') as batch:
        batch.add_column(sa.Column('files', sa.JSON(), nullable=True))
    with op.batch_alter_table('versions') as batch:
        batch.add_column(sa.Column('files', sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('versions') as batch:
        batch.drop_column('files')
    with op.batch_alter_table('experts') as batch:
        batch.drop_column('files')
    with op.batch_alter_table('streams') as batch:
        batch.drop_column('base_files')
