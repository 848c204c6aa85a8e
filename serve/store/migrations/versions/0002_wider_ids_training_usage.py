"""wider version ids (an adapter name of 64 characters plus its digest, a fine-tuned model's `ft:` name), and the
tokens a fine-tuning job trained on in the usage ledger

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

WIDE = 320


def upgrade() -> None:
    # SQLite does not enforce VARCHAR lengths: only PostgreSQL needs the wider columns.
    if op.get_bind().dialect.name == "postgresql":
        op.alter_column("adapter_versions", "id", type_=sa.String(WIDE), existing_type=sa.String(64))
        op.alter_column("usage", "version", type_=sa.String(WIDE), existing_type=sa.String(64))
    op.add_column("usage", sa.Column("trained_tokens", sa.BigInteger(), nullable=False, server_default="0"))


def downgrade() -> None:
    with op.batch_alter_table("usage") as batch_op:
        batch_op.drop_column("trained_tokens")
