"""The store's tables (SQLAlchemy 2 ORM). Changing one means a new Alembic migration in migrations/versions/."""

from __future__ import annotations

from datetime import datetime, timezone

from sqlalchemy import JSON, BigInteger, DateTime, ForeignKey, Index, Integer, String, Text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


def now() -> datetime:
    return datetime.now(timezone.utc)


class Base(DeclarativeBase):
    pass


class TenantRow(Base):
    """A tenant and its hashed keys; the YAML config seeds it, the admin API may grant it more models."""

    __tablename__ = "tenants"
    name: Mapped[str] = mapped_column(String(128), primary_key=True)
    key_hashes: Mapped[list] = mapped_column(JSON, default=list)
    models: Mapped[list] = mapped_column(JSON, default=list)  # granted model names and aliases


class VersionRow(Base):
    """One immutable adapter version, named by a hash of its files: a reused name can never serve stale weights."""

    __tablename__ = "adapter_versions"
    id: Mapped[str] = mapped_column(String(320), primary_key=True)  # "<adapter>@<sha256[:12]>": what vLLM is sent
    adapter: Mapped[str] = mapped_column(String(256), index=True)
    digest: Mapped[str] = mapped_column(String(64))
    base: Mapped[str] = mapped_column(String(256))
    path: Mapped[str] = mapped_column(Text)
    owner: Mapped[str | None] = mapped_column(String(128), nullable=True)  # the tenant it belongs to (None: shared)
    source: Mapped[str | None] = mapped_column(String(64), nullable=True)  # e.g. the fine-tuning job that made it
    meta: Mapped[dict] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=now)


class AliasRow(Base):
    """What a client sends as `model`: one version, or a weighted split of versions (canary)."""

    __tablename__ = "aliases"
    name: Mapped[str] = mapped_column(String(256), primary_key=True)
    targets: Mapped[list] = mapped_column(JSON)  # [{"version": id, "weight": w}], weights sum to 1
    tenants: Mapped[list] = mapped_column(JSON, default=list)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=now)


class AliasHistoryRow(Base):
    __tablename__ = "alias_history"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    alias: Mapped[str] = mapped_column(String(256), ForeignKey("aliases.name", ondelete="CASCADE"), index=True)
    targets: Mapped[list] = mapped_column(JSON)
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=now)


class FileRow(Base):
    """An uploaded file (OpenAI Files API), stored on disk under the data folder."""

    __tablename__ = "files"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    tenant: Mapped[str] = mapped_column(String(128), index=True)
    purpose: Mapped[str] = mapped_column(String(32))
    filename: Mapped[str] = mapped_column(String(512))
    bytes: Mapped[int] = mapped_column(BigInteger)
    path: Mapped[str] = mapped_column(Text)
    lines: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=now)


class JobRow(Base):
    """A fine-tuning job (OpenAI fine-tuning API) and what the worker made of it."""

    __tablename__ = "jobs"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    tenant: Mapped[str] = mapped_column(String(128), index=True)
    model: Mapped[str] = mapped_column(String(256))
    training_file: Mapped[str] = mapped_column(String(64))
    validation_file: Mapped[str | None] = mapped_column(String(64), nullable=True)
    suffix: Mapped[str | None] = mapped_column(String(64), nullable=True)
    seed: Mapped[int] = mapped_column(Integer, default=0)
    hyperparameters: Mapped[dict] = mapped_column(JSON, default=dict)
    extra: Mapped[dict] = mapped_column(JSON, default=dict)  # lorafleet's own options: scorer, promote_if
    status: Mapped[str] = mapped_column(String(32), index=True)
    fine_tuned_model: Mapped[str | None] = mapped_column(String(512), nullable=True)
    trained_tokens: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    error: Mapped[dict | None] = mapped_column(JSON, nullable=True)
    result_files: Mapped[list] = mapped_column(JSON, default=list)
    worker: Mapped[str | None] = mapped_column(String(128), nullable=True)
    heartbeat_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    cancel_requested: Mapped[int] = mapped_column(Integer, default=0)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=now)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class EventRow(Base):
    __tablename__ = "job_events"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job: Mapped[str] = mapped_column(String(64), ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    level: Mapped[str] = mapped_column(String(16), default="info")
    message: Mapped[str] = mapped_column(Text)
    data: Mapped[dict | None] = mapped_column(JSON, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=now)


class CheckpointRow(Base):
    __tablename__ = "job_checkpoints"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    job: Mapped[str] = mapped_column(String(64), ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    step: Mapped[int] = mapped_column(Integer)
    metrics: Mapped[dict] = mapped_column(JSON, default=dict)
    path: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=now)


class UsageRow(Base):
    """The usage ledger: one row per tenant, model (alias) and version per flush; totals are sums."""

    __tablename__ = "usage"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    tenant: Mapped[str] = mapped_column(String(128))
    model: Mapped[str] = mapped_column(String(256))
    version: Mapped[str | None] = mapped_column(String(320), nullable=True)
    requests: Mapped[int] = mapped_column(Integer, default=0)
    prompt_tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    completion_tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    trained_tokens: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")  # fine-tuning jobs
    cost_nano_usd: Mapped[int] = mapped_column(BigInteger, default=0)  # integers: sums are exact in any order
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=now)


Index("ix_usage_tenant_model", UsageRow.tenant, UsageRow.model)
