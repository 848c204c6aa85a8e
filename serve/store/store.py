"""The state store: everything the gateway and the workers learn at run time, behind one interface.

SQLite in the data folder by default (zero setup); a PostgreSQL URL when several gateways or workers share it.
SQLAlchemy 2 does the SQL for both; Alembic migrates the schema on open, so a newer lorafleet upgrades the
database it finds. Every write is one transaction: a request that fails half-way leaves nothing half-written.
"""

from __future__ import annotations

import hashlib
import secrets
import threading
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import create_engine, delete, event, func, select, update
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError, InterfaceError, OperationalError
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import StaticPool

from serve.store.schema import (
    AliasHistoryRow,
    AliasRow,
    CheckpointRow,
    EventRow,
    FileRow,
    JobRow,
    TenantRow,
    UsageRow,
    VersionRow,
    now,
)

MIGRATIONS = Path(__file__).parent / "migrations"
NANO = 1_000_000_000  # the ledger keeps $ as integer nano-dollars: sums are exact in any order
TERMINAL = ("succeeded", "failed", "cancelled")


class StoreError(ValueError):
    """A write the store refuses (unknown version, bad split...); the message names what to fix."""


class QuotaExceeded(StoreError):
    """A tenant's cap on what it keeps here (bytes of files, jobs not ended) would be passed; nothing was written."""


class StoreUnavailable(RuntimeError):
    """The database cannot be reached (down, restarting, network): retry later; nothing was written."""


def new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(12)}"


def digest_folder(path: Path) -> str:
    """sha256 over the adapter's files (names and bytes, in name order): the identity of a version."""
    h = hashlib.sha256()
    for f in sorted(p for p in Path(path).rglob("*") if p.is_file()):
        h.update(str(f.relative_to(path)).encode() + b"\0")
        h.update(f.read_bytes())
    return h.hexdigest()


def version_id(adapter: str, path: Path) -> str:
    return f"{adapter}@{digest_folder(path)[:12]}"


def migrate(engine: Engine) -> None:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "head")


def _sqlite_pragmas(dbapi_conn: Any, _: Any) -> None:
    # WAL: readers never block the writer; busy_timeout: two processes on one file wait instead of failing.
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA busy_timeout=10000")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.close()


class Store:
    def __init__(self, url: str):
        self.url, self.up = url, True  # `up`: whether the last transaction reached the database
        self.backend = "postgresql" if url.startswith("postgresql") else "sqlite"
        self._one_at_a_time: AbstractContextManager = nullcontext()
        if url == "memory":  # one connection shared by every thread: the database lives as long as the process
            self.engine = create_engine("sqlite://", poolclass=StaticPool, connect_args={"check_same_thread": False})
            # Two threads' transactions on that one connection would interleave ("cannot commit - no transaction
            # is active": a worker thread beside the gateway's saw it): one transaction at a time.
            self._one_at_a_time = threading.RLock()
            event.listen(self.engine, "connect", _sqlite_pragmas)
        elif url.startswith("sqlite"):
            self.engine = create_engine(url, connect_args={"check_same_thread": False})
            event.listen(self.engine, "connect", _sqlite_pragmas)
        else:
            # pre-ping: a connection the server dropped (restart) is replaced, not handed out; connect_timeout: an
            # unreachable server fails a request in seconds instead of hanging it
            self.engine = create_engine(url, pool_pre_ping=True, connect_args={"connect_timeout": 3})
        migrate(self.engine)
        self._session = sessionmaker(self.engine, expire_on_commit=False)

    @classmethod
    def open(cls, url: str, data: Path) -> Store:
        """`sqlite` means data/lorafleet.db; any other value is a SQLAlchemy URL (or `memory`)."""
        if url == "sqlite":
            data.mkdir(parents=True, exist_ok=True)
            url = f"sqlite:///{data / 'lorafleet.db'}"
        return cls(url)

    @contextmanager
    def tx(self) -> Iterator[Session]:
        try:
            with self._one_at_a_time, self._session() as s, s.begin():
                yield s
        except (OperationalError, InterfaceError) as e:  # the connection, not the statement: retry later
            self.up = False
            raise StoreUnavailable(f"the state store ({self.backend}) is unreachable: {e.orig or e}") from None
        self.up = True

    def close(self) -> None:
        self.engine.dispose()

    # -- tenants

    def seed_tenants(self, tenants: list[dict]) -> None:
        """The config's tenants: their keys are replaced, models granted at run time are kept."""
        with self.tx() as s:
            for t in tenants:
                row = s.get(TenantRow, t["name"])
                if row is None:
                    s.add(TenantRow(name=t["name"], key_hashes=list(t["key_hashes"]), models=sorted(t["models"])))
                else:
                    row.key_hashes = list(t["key_hashes"])
                    row.models = sorted(set(row.models) | set(t["models"]))

    def tenant_models(self) -> dict[str, list[str]]:
        with self.tx() as s:
            return {r.name: list(r.models) for r in s.scalars(select(TenantRow))}

    def grant(self, model: str, tenants: list[str]) -> None:
        with self.tx() as s:
            for name in tenants:
                row = s.get(TenantRow, name)
                if row is None:
                    raise StoreError(f"unknown tenant {name!r}")
                row.models = sorted(set(row.models) | {model})

    def revoke(self, model: str, tenants: list[str] | None = None) -> None:
        """Take a granted model from these tenants (None: from every tenant)."""
        with self.tx() as s:
            for row in s.scalars(select(TenantRow)):
                if model in row.models and (tenants is None or row.name in tenants):
                    row.models = [m for m in row.models if m != model]

    # -- adapter versions

    def add_version(
        self, adapter: str, path: Path, base: str, owner: str | None = None, source: str | None = None,
        meta: dict | None = None,
    ) -> VersionRow:  # fmt: skip
        """The version of `adapter` with these files; the same files give the same (existing) version."""
        digest = digest_folder(path)
        vid = f"{adapter}@{digest[:12]}"
        with self.tx() as s:
            row = s.get(VersionRow, vid)
            if row is None:
                row = VersionRow(id=vid, adapter=adapter, digest=digest, base=base, path=str(path), owner=owner,
                                 source=source, meta=meta or {})  # fmt: skip
                s.add(row)
            return row

    def version(self, vid: str) -> VersionRow | None:
        with self.tx() as s:
            return s.get(VersionRow, vid)

    def versions(self, adapter: str | None = None) -> list[VersionRow]:
        with self.tx() as s:
            q = select(VersionRow).order_by(VersionRow.created_at, VersionRow.id)
            return list(s.scalars(q.where(VersionRow.adapter == adapter) if adapter else q))

    # -- aliases

    def set_alias(
        self, name: str, targets: list[dict], tenants: list[str] | None = None, owner: str | None = None
    ) -> AliasRow:
        """Point an alias at one version or a weighted split; the previous target goes to its history. With
        `owner` (a tenant's promotion), only an alias that is new or points only at that tenant's versions moves:
        checked in the same transaction as the write."""
        try:
            return self._set_alias(name, targets, tenants, owner)
        except IntegrityError:  # two writers created the alias at once: the other one won
            raise StoreError(f"alias {name!r} was just created by another request; try again") from None

    def _set_alias(self, name: str, targets: list[dict], tenants: list[str] | None, owner: str | None) -> AliasRow:
        with self.tx() as s:
            self._check_targets(s, targets)
            row = s.get(AliasRow, name)
            if owner is not None and row is not None and self._owners(s, row.targets) != {owner}:
                raise StoreError(f"alias {name!r} serves models that are not yours; choose another alias")
            if row is None:
                row = AliasRow(name=name, targets=targets, tenants=tenants or [])
                s.add(row)
            else:
                row.targets, row.updated_at = targets, now()
                if tenants is not None:
                    row.tenants = tenants
            s.flush()
            s.add(AliasHistoryRow(alias=name, targets=targets))
            return row

    def _check_targets(self, s: Session, targets: list[dict]) -> None:
        if not targets:
            raise StoreError("targets: give at least one {version, weight}")
        for i, t in enumerate(targets):
            if s.get(VersionRow, t.get("version", "")) is None:
                raise StoreError(f"targets.{i}.version: no version {t.get('version')!r}")
            if not 0 < float(t.get("weight", 0)) <= 1:
                raise StoreError(f"targets.{i}.weight: must be in (0, 1], got {t.get('weight')!r}")
        total = sum(float(t["weight"]) for t in targets)
        if abs(total - 1) > 1e-6:
            raise StoreError(f"targets: weights must sum to 1, got {total:g}")

    @staticmethod
    def _owners(s: Session, targets: list[dict]) -> set[str | None]:
        return {(v.owner if (v := s.get(VersionRow, t.get("version", ""))) is not None else None) for t in targets}

    def alias_owners(self, name: str) -> set[str | None] | None:
        """The owners of the versions an alias points at (None for a shared version); None if there is no alias."""
        with self.tx() as s:
            row = s.get(AliasRow, name)
            return None if row is None else self._owners(s, row.targets)

    def delete_alias(self, name: str) -> bool:
        with self.tx() as s:
            row = s.get(AliasRow, name)
            if row is None:
                return False
            s.delete(row)
            return True

    def alias(self, name: str) -> AliasRow | None:
        with self.tx() as s:
            return s.get(AliasRow, name)

    def aliases(self) -> list[AliasRow]:
        with self.tx() as s:
            return list(s.scalars(select(AliasRow).order_by(AliasRow.name)))

    def history(self, name: str) -> list[AliasHistoryRow]:
        with self.tx() as s:
            q = select(AliasHistoryRow).where(AliasHistoryRow.alias == name).order_by(AliasHistoryRow.id)
            return list(s.scalars(q))

    def rollback(self, name: str) -> AliasRow:
        """Point the alias back at what it pointed to before its current target."""
        past = self.history(name)
        if len(past) < 2:
            raise StoreError(f"alias {name!r} has no earlier target to roll back to")
        return self.set_alias(name, past[-2].targets)

    # -- files

    def add_file(
        self, tenant: str, purpose: str, filename: str, data: bytes, folder: Path, lines: int, quota: int | None = None
    ) -> FileRow:
        """Keep a file; with `quota`, only if the tenant's files stay within that many bytes (checked in the same
        transaction, under a lock on the tenant's row where the database has one)."""
        fid = new_id("file")
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / fid
        path.write_bytes(data)  # the bytes first: a row never points at a missing file
        try:
            with self.tx() as s:
                if quota is not None and self._used_bytes(s, tenant) + len(data) > quota:
                    raise QuotaExceeded(f"your files would take more than your {quota}-byte storage limit")
                row = FileRow(id=fid, tenant=tenant, purpose=purpose, filename=filename, bytes=len(data),
                              path=str(path), lines=lines)  # fmt: skip
                s.add(row)
                return row
        except BaseException:  # no row: no file left behind either
            path.unlink(missing_ok=True)
            raise

    def file(self, fid: str, tenant: str) -> FileRow | None:
        """A tenant's own file; another tenant's is None, exactly like one that does not exist."""
        with self.tx() as s:
            row = s.get(FileRow, fid)
            return row if row is not None and row.tenant == tenant else None

    def files(self, tenant: str, purpose: str | None = None) -> list[FileRow]:
        with self.tx() as s:
            q = select(FileRow).where(FileRow.tenant == tenant).order_by(FileRow.created_at.desc(), FileRow.id)
            return list(s.scalars(q.where(FileRow.purpose == purpose) if purpose else q))

    def delete_file(self, fid: str, tenant: str) -> bool:
        """Delete a tenant's file; False if it has none by that id. A file a job still needs is kept: StoreError."""
        with self.tx() as s:
            row = s.get(FileRow, fid)
            if row is None or row.tenant != tenant:
                return False
            uses = (JobRow.training_file == fid) | (JobRow.validation_file == fid)
            busy = s.scalar(select(JobRow.id).where(uses, JobRow.status.not_in(TERMINAL)).limit(1))
            if busy is not None:
                raise StoreError(f"file {fid} is used by fine-tuning job {busy}, which has not ended; cancel it first")
            s.delete(row)
        Path(row.path).unlink(missing_ok=True)
        return True

    @staticmethod
    def _lock_tenant(s: Session, tenant: str) -> None:
        # Two requests of one tenant checking a cap at once: on PostgreSQL the second waits here for the first.
        s.execute(select(TenantRow.name).where(TenantRow.name == tenant).with_for_update())

    def _used_bytes(self, s: Session, tenant: str) -> int:
        self._lock_tenant(s, tenant)
        return int(s.scalar(select(func.coalesce(func.sum(FileRow.bytes), 0)).where(FileRow.tenant == tenant)))

    def _active_jobs(self, s: Session, tenant: str) -> int:
        self._lock_tenant(s, tenant)
        q = select(func.count()).select_from(JobRow).where(JobRow.tenant == tenant, JobRow.status.not_in(TERMINAL))
        return int(s.scalar(q))

    # -- fine-tuning jobs

    def create_job(self, max_active: int | None = None, **fields: Any) -> JobRow:
        """A new job; with `max_active`, only if the tenant has fewer jobs than that which have not ended."""
        with self.tx() as s:
            if max_active is not None and self._active_jobs(s, fields["tenant"]) >= max_active:
                raise QuotaExceeded(f"you have {max_active} fine-tuning jobs that have not ended, your limit")
            row = JobRow(id=new_id("ftjob"), **fields)
            s.add(row)
            s.flush()
            s.add(EventRow(job=row.id, message="Created fine-tuning job"))
            return row

    def job(self, jid: str, tenant: str | None = None) -> JobRow | None:
        with self.tx() as s:
            row = s.get(JobRow, jid)
            return row if row is not None and (tenant is None or row.tenant == tenant) else None

    def jobs(self, tenant: str, after: str | None = None, limit: int = 20) -> tuple[list[JobRow], bool]:
        """A page of a tenant's jobs, newest first, after the job id `after`; and whether there are more."""
        with self.tx() as s:
            q = select(JobRow).where(JobRow.tenant == tenant).order_by(JobRow.created_at.desc(), JobRow.id.desc())
            rows = list(s.scalars(q))
        if after is not None:
            ids = [r.id for r in rows]
            rows = rows[ids.index(after) + 1 :] if after in ids else []
        return rows[:limit], len(rows) > limit

    def update_job(self, jid: str, **fields: Any) -> JobRow:
        with self.tx() as s:
            row = s.get(JobRow, jid)
            for k, v in fields.items():
                setattr(row, k, v)
            if fields.get("status") in TERMINAL:
                row.finished_at = now()
            return row

    def event(self, jid: str, message: str, level: str = "info", data: dict | None = None) -> None:
        with self.tx() as s:
            s.add(EventRow(job=jid, message=message, level=level, data=data))

    def events(self, jid: str, after: int | None = None, limit: int = 20) -> tuple[list[EventRow], bool]:
        """Newest first, like OpenAI's list; `after` is an event id (older events follow it)."""
        with self.tx() as s:
            q = select(EventRow).where(EventRow.job == jid).order_by(EventRow.id.desc())
            if after is not None:
                q = q.where(EventRow.id < after)
            rows = list(s.scalars(q.limit(limit + 1)))
        return rows[:limit], len(rows) > limit

    def add_checkpoint(self, jid: str, step: int, path: Path, metrics: dict) -> CheckpointRow:
        with self.tx() as s:
            row = CheckpointRow(id=new_id("ftckpt"), job=jid, step=step, path=str(path), metrics=metrics)
            s.add(row)
            return row

    def clear_checkpoints(self, jid: str) -> None:
        """A retried job starts over: the checkpoints of its lost attempt are gone with their folders."""
        with self.tx() as s:
            s.execute(delete(CheckpointRow).where(CheckpointRow.job == jid))

    def checkpoints(self, jid: str) -> list[CheckpointRow]:
        with self.tx() as s:
            q = select(CheckpointRow).where(CheckpointRow.job == jid).order_by(CheckpointRow.step.desc())
            return list(s.scalars(q))

    def claim_job(self, worker: str) -> JobRow | None:
        """Take a queued job, atomically: with several workers on one database each job runs once. Tenants take
        turns (tests/serve/test_attacks.py): the oldest job of the tenant with the fewest jobs running whose last
        job ran longest ago, so thirty jobs queued by one tenant do not starve the next tenant's one."""
        for _ in range(5):
            with self.tx() as s:
                jid = self._next_queued(s)
                if jid is None:
                    return None
                # Compare-and-set: another worker may have taken it between the select and this update.
                taken = s.execute(
                    update(JobRow).where(JobRow.id == jid, JobRow.status == "queued")
                    .values(status="running", worker=worker, heartbeat_at=now(), attempts=JobRow.attempts + 1)
                ).rowcount  # fmt: skip
            if taken:
                self.event(jid, f"Fine-tuning job started on worker {worker}")
                return self.job(jid)
        return None

    @staticmethod
    def _next_queued(s: Session) -> str | None:
        queued = list(s.execute(select(JobRow.id, JobRow.tenant).where(JobRow.status == "queued")
                                .order_by(JobRow.created_at, JobRow.id)))  # fmt: skip
        if not queued:
            return None
        tenants = {t: i for i, (_, t) in reversed(list(enumerate(queued)))}  # tenant -> where its oldest job is
        started = select(JobRow.tenant, func.count(JobRow.id).filter(JobRow.status == "running"),
                         func.max(JobRow.heartbeat_at)).where(JobRow.tenant.in_(tenants)).group_by(JobRow.tenant)  # fmt: skip
        turn = {t: (running, _aware(last) if last else datetime.min.replace(tzinfo=timezone.utc))
                for t, running, last in s.execute(started)}  # fmt: skip
        never = (0, datetime.min.replace(tzinfo=timezone.utc))
        first = min(tenants, key=lambda t: (*turn.get(t, never), tenants[t]))
        return next(jid for jid, t in queued if t == first)

    def jobs_with_status(self, status: str) -> list[JobRow]:
        with self.tx() as s:
            return list(s.scalars(select(JobRow).where(JobRow.status == status).order_by(JobRow.created_at)))

    def advance_job(self, jid: str, status: str, to: str, **fields: Any) -> bool:
        """Move a job from `status` to `to` only if it is still in `status` (compare-and-set): of two workers,
        or a worker and a cancel, exactly one wins."""
        values = {"status": to, **fields} | ({"finished_at": now()} if to in TERMINAL else {})
        with self.tx() as s:
            return bool(s.execute(update(JobRow).where(JobRow.id == jid, JobRow.status == status).values(**values))
                        .rowcount)  # fmt: skip

    def heartbeat(self, jid: str) -> bool:
        """Refresh a running job's heartbeat; False if it was cancelled meanwhile (the worker then stops)."""
        with self.tx() as s:
            row = s.get(JobRow, jid)
            row.heartbeat_at = now()
            return not row.cancel_requested

    def stale_jobs(self, older_than_s: float) -> list[JobRow]:
        """Running jobs whose worker stopped beating: crashed, killed or cut off."""
        limit = datetime.now(timezone.utc) - timedelta(seconds=older_than_s)
        with self.tx() as s:
            rows = list(s.scalars(select(JobRow).where(JobRow.status == "running")))
        return [r for r in rows if r.heartbeat_at is None or _aware(r.heartbeat_at) < limit]

    # -- usage ledger

    def record_usage(self, rows: list[dict]) -> None:
        """Append usage rows {tenant, model, version, requests, prompt_tokens, completion_tokens, cost_usd}."""
        if not rows:
            return
        with self.tx() as s:
            for r in rows:
                s.add(UsageRow(tenant=r["tenant"], model=r["model"], version=r.get("version"), requests=r["requests"],
                               prompt_tokens=r["prompt_tokens"], completion_tokens=r["completion_tokens"],
                               trained_tokens=r.get("trained_tokens", 0),
                               cost_nano_usd=r["cost_nano_usd"] if "cost_nano_usd" in r else round(r["cost_usd"] * NANO)))  # fmt: skip

    def training_usage(self, after: int = 0) -> list[UsageRow]:
        """Ledger rows of fine-tuning jobs (trained tokens) with an id above `after`, oldest first."""
        with self.tx() as s:
            q = select(UsageRow).where(UsageRow.id > after, UsageRow.trained_tokens > 0).order_by(UsageRow.id)
            return list(s.scalars(q))

    def last_usage_id(self) -> int:
        with self.tx() as s:
            return int(s.scalar(select(func.coalesce(func.max(UsageRow.id), 0))))

    def usage_by_model(self, tenant: str) -> dict[tuple[str, str | None], int]:
        """A tenant's requests per (model it asked for, version that answered): the aliases' split as billed."""
        q = (select(UsageRow.model, UsageRow.version, func.sum(UsageRow.requests)).where(UsageRow.tenant == tenant)
             .group_by(UsageRow.model, UsageRow.version))  # fmt: skip
        with self.tx() as s:
            return {(m, v): int(n) for m, v, n in s.execute(q).all()}

    def usage_totals(self) -> dict[str, dict[str, Any]]:
        """Per tenant: requests, prompt and completion tokens and $ summed over the whole ledger."""
        cols = (func.sum(UsageRow.requests), func.sum(UsageRow.prompt_tokens), func.sum(UsageRow.completion_tokens),
                func.sum(UsageRow.cost_nano_usd))  # fmt: skip
        with self.tx() as s:
            rows = s.execute(select(UsageRow.tenant, *cols).group_by(UsageRow.tenant)).all()
        return {t: {"requests": int(r), "prompt_tokens": int(p), "completion_tokens": int(c),
                    "cost_nano_usd": int(n)} for t, r, p, c, n in rows}  # fmt: skip


def _aware(t: datetime) -> datetime:
    # SQLite hands back naive datetimes for what was stored as UTC.
    return t if t.tzinfo else t.replace(tzinfo=timezone.utc)
