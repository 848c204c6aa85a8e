"""The OpenAI Files and fine-tuning API, per tenant: what the official `openai` client sends, checked at the edge.

A file is checked line by line at upload (the trainer's own formats, train.data), so a tenant learns of a bad
line in seconds, not when a worker picks the job up. A job is queued in the store; a worker (lorafleet.worker)
claims it, trains, evaluates and registers the result. A tenant sees only its own files and jobs: anything else
answers exactly like an id that does not exist.
"""

from __future__ import annotations

import json
import re
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from lorafleet.core.scorers import make_scorer
from serve.config import Name, ServeConfig
from serve.gateway.protocol import ApiError, bad_request, invalid_body
from serve.gateway.tenants import Tenant
from serve.store.schema import CheckpointRow, EventRow, FileRow, JobRow
from serve.store.store import TERMINAL, QuotaExceeded, Store
from train.data import DataError, to_conversation

PURPOSES = ("fine-tune",)  # what this gateway accepts; OpenAI's other purposes have no use here
MAX_LINE_ERRORS = 10
MAX_FILENAME = 512  # the store's column (serve/store/schema.py FileRow.filename)


def _ts(t: datetime | None) -> int | None:
    return None if t is None else int(t.timestamp())


def not_found(kind: str, ident: str) -> ApiError:
    return ApiError(404, f"No such {kind}: {ident}", code="not_found")


# -- files


def check_jsonl(data: bytes, filename: str) -> int:
    """The number of examples; the first MAX_LINE_ERRORS bad lines named in one 400 (the rest counted), nothing
    stored. A line no parser can hold (nested 100k deep, a 5,000-digit number) is a bad line like any other."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise bad_request(f"file: {filename} is not UTF-8 text ({e.reason})", param="file") from None
    count, bad, problems = 0, 0, []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            to_conversation(json.loads(line))
            count += 1
            continue
        except json.JSONDecodeError as e:
            problem = f"line {lineno}: bad JSON: {e.msg}"
        except (ValueError, RecursionError) as e:  # too deep, or an int over Python's digit limit
            problem = f"line {lineno}: bad JSON: {type(e).__name__}"
        except DataError as e:
            problem = f"line {lineno}: {e}"
        bad += 1
        if len(problems) < MAX_LINE_ERRORS:  # keep a few: 5 MB of bad lines must not become 5 MB of messages
            problems.append(problem[:300])
    if bad:
        more = f" (and {bad - MAX_LINE_ERRORS} more)" if bad > MAX_LINE_ERRORS else ""
        raise bad_request(f"file: {filename} has {bad} bad line(s): " + "; ".join(problems) + more, param="file",
                          code="invalid_file_format")  # fmt: skip
    if count == 0:
        raise bad_request(f"file: {filename} has no examples", param="file", code="invalid_file_format")
    return count


def file_object(row: FileRow) -> dict:
    return {"object": "file", "id": row.id, "bytes": row.bytes, "created_at": _ts(row.created_at),
            "filename": row.filename, "purpose": row.purpose, "status": "processed", "status_details": None}  # fmt: skip


def upload(store: Store, folder: Path, tenant: Tenant, purpose: str | None, filename: str, data: bytes,
           max_bytes: int) -> dict:  # fmt: skip
    if purpose not in PURPOSES:
        raise bad_request(f"purpose: must be one of {', '.join(PURPOSES)}, got {str(purpose)[:64]!r}", param="purpose")
    if len(filename) > MAX_FILENAME:
        raise bad_request(f"file: a file name of at most {MAX_FILENAME} characters, got {len(filename)}", param="file")
    if len(data) > max_bytes:
        raise ApiError(413, f"file: over the {max_bytes}-byte limit", param="file", code="file_too_large")
    lines = check_jsonl(data, filename)
    try:
        row = store.add_file(tenant.name, purpose, filename, data, folder / tenant.name, lines,
                             quota=tenant.limits.storage_bytes)  # fmt: skip
    except QuotaExceeded as e:
        raise quota_exceeded(f"file: {e}; delete some first (DELETE /v1/files/ID)", param="file") from None
    return file_object(row)


def quota_exceeded(message: str, param: str | None = None) -> ApiError:
    """A per-tenant cap on what it keeps here (jobs not ended, bytes stored): 429, no Retry-After (it will not
    pass on its own)."""
    return ApiError(429, message, type="insufficient_quota", param=param, code="quota_exceeded")


def own_file(store: Store, fid: str, tenant: str) -> FileRow:
    row = store.file(fid, tenant)
    if row is None:
        raise not_found("file", fid)
    return row


# -- jobs


Auto = Literal["auto"]


class Hyperparameters(BaseModel):
    model_config = ConfigDict(extra="forbid")
    n_epochs: int | Auto = Field("auto", description="passes over the training file (1-50)")
    batch_size: int | Auto = Field("auto", description="examples per step (1-256)")
    learning_rate_multiplier: float | Auto = Field("auto", description="times the recipe's learning rate (0-10]")

    @field_validator("n_epochs")
    @classmethod
    def _epochs(cls, v):
        if v != "auto" and not 1 <= v <= 50:
            raise ValueError(f"must be 'auto' or 1-50, got {v}")
        return v

    @field_validator("batch_size")
    @classmethod
    def _batch(cls, v):
        if v != "auto" and not 1 <= v <= 256:
            raise ValueError(f"must be 'auto' or 1-256, got {v}")
        return v

    @field_validator("learning_rate_multiplier")
    @classmethod
    def _lr(cls, v):
        if v != "auto" and not 0 < v <= 10:
            raise ValueError(f"must be 'auto' or in (0, 10], got {v}")
        return v


class PromoteIf(BaseModel):
    """lorafleet's gate: move the tenant's alias to the new version only if it beats the base by `min_gain`."""

    model_config = ConfigDict(extra="forbid")
    alias: Name = Field(description="the tenant's alias to move, e.g. 'support': new, or one only its models use")
    min_gain: float = Field(0.0, ge=-1, le=1, description="validation accuracy gain over the base model, 0-1")


class Supervised(BaseModel):
    model_config = ConfigDict(extra="forbid")
    hyperparameters: Hyperparameters | None = None


class Method(BaseModel):
    """OpenAI's `method`: only supervised fine-tuning runs here."""

    model_config = ConfigDict(extra="forbid")
    type: Literal["supervised"] = Field("supervised", description="only 'supervised' is supported")
    supervised: Supervised | None = None


class CreateJob(BaseModel):
    """Body of POST /v1/fine_tuning/jobs: OpenAI's fields, and lorafleet's `scorer` and `promote_if`."""

    model_config = ConfigDict(extra="ignore")  # integrations, metadata...: accepted, not acted on
    model: str = Field(max_length=256, description="a LoRA-enabled base model served here")
    training_file: str = Field(max_length=64, description="a file id from POST /v1/files")
    validation_file: str | None = Field(None, max_length=64, description="scored against the base model")
    suffix: str | None = Field(None, max_length=64)
    seed: int | None = Field(None, ge=0, le=2**31 - 1)
    hyperparameters: Hyperparameters | None = None
    method: Method | None = None
    scorer: str | dict[str, Any] = Field("exact", description="lorafleet: how the validation file is scored")
    promote_if: PromoteIf | None = None

    @field_validator("suffix")
    @classmethod
    def _suffix(cls, v):
        if v is not None and not re.fullmatch(r"[A-Za-z0-9_-]+", v):
            raise ValueError("use letters, digits, '-' and '_' only")
        return v

    def hyper(self) -> Hyperparameters:
        """`method.supervised.hyperparameters` (the newer form) or `hyperparameters` (the older one)."""
        if self.method is not None and self.method.supervised is not None:
            return self.method.supervised.hyperparameters or Hyperparameters()
        return self.hyperparameters or Hyperparameters()


def parse_job(raw: bytes) -> CreateJob:
    try:
        return CreateJob.model_validate_json(raw)
    except ValidationError as e:
        raise invalid_body(e) from None


def create_job(req: CreateJob, *, store: Store, cfg: ServeConfig, tenant: Tenant) -> dict:
    engine = cfg.engine_for(req.model)
    if engine is None or not engine.enable_lora:
        bases = sorted(e.public_name for e in cfg.engines if e.enable_lora)
        raise bad_request(f"model: {req.model!r} cannot be fine-tuned here; base models: {bases}", param="model",
                          code="model_not_available")  # fmt: skip
    for field in ("training_file", "validation_file"):
        fid = getattr(req, field)
        if fid is not None and store.file(fid, tenant.name) is None:  # another tenant's file is as unknown as none
            raise bad_request(f"{field}: no file {fid!r}", param=field, code="invalid_file")
    try:  # the scorer is checked here, not hours later when the worker runs
        make_scorer(req.scorer)
    except (ValueError, TypeError) as e:
        raise bad_request(f"scorer: {e}", param="scorer") from None
    hyper = req.hyper()
    if req.promote_if is not None:
        refusal = alias_refusal(store, cfg, req.promote_if.alias, tenant.name)
        if refusal:
            raise bad_request(f"promote_if.alias: {refusal}", param="promote_if.alias", code="alias_taken")
    try:
        row = store.create_job(
            max_active=tenant.limits.fine_tuning_jobs,
            tenant=tenant.name, model=req.model, training_file=req.training_file, validation_file=req.validation_file,
            suffix=req.suffix, seed=req.seed if req.seed is not None else 42, hyperparameters=hyper.model_dump(),
            extra={"scorer": req.scorer, "promote_if": req.promote_if.model_dump() if req.promote_if else None},
            status="validating_files",  # a worker checks the data (lorafleet.worker.Worker.validate), then queues it
        )  # fmt: skip
    except QuotaExceeded as e:
        raise quota_exceeded(f"{e}; wait for one to end or cancel one") from None
    return job_object(row)


def alias_refusal(store: Store, cfg: ServeConfig, alias: str, tenant: str) -> str | None:
    """Why a tenant's job may not move `alias`, or None: an alias is the tenant's to move only if it does not exist
    yet or every version it serves is the tenant's own. A configured model's name is never one (checked when the
    job is created and again at promotion: tests/serve/test_attacks.py)."""
    owners = store.alias_owners(alias)
    if alias in cfg.model_names() or (owners is not None and owners != {tenant}):
        return f"{alias!r} is taken; name an alias of your own"
    return None


def job_object(row: JobRow) -> dict:
    return {
        "object": "fine_tuning.job", "id": row.id, "model": row.model, "created_at": _ts(row.created_at),
        "finished_at": _ts(row.finished_at), "fine_tuned_model": row.fine_tuned_model, "organization_id": row.tenant,
        "result_files": list(row.result_files or []), "status": row.status, "validation_file": row.validation_file,
        "training_file": row.training_file, "hyperparameters": row.hyperparameters, "trained_tokens": row.trained_tokens,
        "error": row.error, "seed": row.seed, "user_provided_suffix": row.suffix, "estimated_finish": None,
        "integrations": [], "metadata": None,
        "method": {"type": "supervised", "supervised": {"hyperparameters": row.hyperparameters}},
    }  # fmt: skip


def own_job(store: Store, jid: str, tenant: str) -> JobRow:
    row = store.job(jid, tenant)
    if row is None:
        raise not_found("fine-tuning job", jid)
    return row


def list_jobs(store: Store, tenant: str, after: str | None, limit: int) -> dict:
    rows, more = store.jobs(tenant, after, _limit(limit))
    return {"object": "list", "data": [job_object(r) for r in rows], "has_more": more}


def _limit(limit: int) -> int:
    if not 1 <= limit <= 100:
        raise bad_request(f"limit: must be 1-100, got {limit}", param="limit")
    return limit


def cancel(store: Store, jid: str, tenant: str) -> dict:
    row = own_job(store, jid, tenant)
    if row.status in TERMINAL:
        raise bad_request(f"Job {jid} has already {row.status}; only a queued or running job can be cancelled",
                          code="invalid_job_state")  # fmt: skip
    if row.status == "running":
        store.update_job(jid, cancel_requested=1)  # the worker stops on its next heartbeat (about a second)
        store.event(jid, "Cancellation requested")
        row = store.job(jid)
    elif store.advance_job(jid, row.status, "cancelled", cancel_requested=1):  # unless a worker took it meanwhile
        store.event(jid, "Fine-tuning job cancelled")
    else:
        store.update_job(jid, cancel_requested=1)
        store.event(jid, "Cancellation requested")
    return job_object(store.job(jid))


def event_object(row: EventRow) -> dict:
    return {"object": "fine_tuning.job.event", "id": f"ftevent-{row.id}", "created_at": _ts(row.created_at),
            "level": row.level, "message": row.message, "data": row.data,
            "type": "metrics" if row.data else "message"}  # fmt: skip


def list_events(store: Store, jid: str, tenant: str, after: str | None, limit: int) -> dict:
    own_job(store, jid, tenant)
    cursor = None
    if after is not None:
        m = re.fullmatch(r"ftevent-(\d{1,18})", after)  # the store's ids fit 63 bits
        if m is None:
            raise bad_request(f"after: not an event id: {after[:64]!r}", param="after")
        cursor = int(m.group(1))
    rows, more = store.events(jid, cursor, _limit(limit))
    return {"object": "list", "data": [event_object(r) for r in rows], "has_more": more}


def checkpoint_object(row: CheckpointRow, job: JobRow) -> dict:
    base = f"ft:{job.model}:{job.tenant}:{job.suffix or ''}:{job.id}"
    return {"object": "fine_tuning.job.checkpoint", "id": row.id, "created_at": _ts(row.created_at),
            "fine_tuned_model_checkpoint": f"{base}:ckpt-step-{row.step}", "fine_tuning_job_id": job.id,
            "metrics": row.metrics, "step_number": row.step}  # fmt: skip


def list_checkpoints(store: Store, jid: str, tenant: str) -> dict:
    job = own_job(store, jid, tenant)
    data = [checkpoint_object(r, job) for r in store.checkpoints(jid)]
    first, last = (data[0]["id"], data[-1]["id"]) if data else (None, None)
    return {"object": "list", "data": data, "has_more": False, "first_id": first, "last_id": last}


def fine_tuned_name(job: JobRow) -> str:
    """OpenAI's form: ft:<base>:<organization>:<suffix>:<job id>."""
    return f"ft:{job.model}:{job.tenant}:{job.suffix or ''}:{job.id}"
