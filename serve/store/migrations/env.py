"""Alembic's entry point: `Store` runs `upgrade head` on open, so a new gateway version migrates the database."""

from __future__ import annotations

from alembic import context
from sqlalchemy import engine_from_config, pool

from serve.store.schema import Base

config = context.config
connection = config.attributes.get("connection")
if connection is not None:  # handed over by Store (tests and the gateway), so SQLite in-memory works too
    context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()
else:  # the `alembic` command line with sqlalchemy.url set
    engine = engine_from_config(
        config.get_section(config.config_ini_section, {}), prefix="sqlalchemy.", poolclass=pool.NullPool
    )
    with engine.connect() as conn:
        context.configure(connection=conn, target_metadata=Base.metadata, render_as_batch=True)
        with context.begin_transaction():
            context.run_migrations()
