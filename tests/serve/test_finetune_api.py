"""The OpenAI Files and fine-tuning API through the real gateway, driven by the official `openai` client: the round
trip, every bad input as a 4xx naming the field with nothing half-written, and tenants isolated from each other."""

from __future__ import annotations

import json

import openai
import pytest

from serve.gateway.app import ServerThread, create_app
from tests.conftest import MODELS, free_port
from tests.serve.conftest import KEYS, config, tenant

TINY = str(MODELS / "tiny-random-llama")
ROWS = [{"messages": [{"role": "user", "content": f"ticket {i}"}, {"role": "assistant", "content": "billing"}]}
        for i in range(6)]  # fmt: skip
JSONL = "".join(json.dumps(r) + "\n" for r in ROWS).encode()


@pytest.fixture
def gw(fake_engine, tmp_path, monkeypatch):
    monkeypatch.setenv("LORAFLEET_HOME", str(tmp_path))  # uploads go under this test's data folder
    engines = [{"name": "fake", "model": TINY, "served_name": "fake-base", "urls": [fake_engine.url]},
               {"name": "nolora", "model": TINY, "served_name": "plain", "urls": [fake_engine.url], "port": 8009,
                "enable_lora": False}]  # fmt: skip
    cfg = config(engines, [tenant("acme", ["fake-base"]), tenant("globex", ["fake-base"])],
                 adapters_root=tmp_path / "adapters", max_file_bytes=4096)  # fmt: skip
    server = ServerThread(create_app(cfg), port=free_port()).start()
    yield server
    server.stop()


def client(gw, who: str = "acme") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gw.url}/v1", api_key=KEYS[who], max_retries=0)


def test_files_and_jobs_round_trip_with_the_openai_client(gw):
    c = client(gw)
    f = c.files.create(file=("train.jsonl", JSONL), purpose="fine-tune")
    assert f.id.startswith("file-") and f.bytes == len(JSONL) and f.purpose == "fine-tune" and f.status == "processed"
    assert [x.id for x in c.files.list().data] == [f.id]
    assert c.files.retrieve(f.id).filename == "train.jsonl"
    assert c.files.content(f.id).read() == JSONL

    job = c.fine_tuning.jobs.create(model="fake-base", training_file=f.id, suffix="tickets",
                                    hyperparameters={"n_epochs": 2, "learning_rate_multiplier": 0.5})  # fmt: skip
    # the data is read by a worker before the job waits in the queue (none runs here)
    assert job.status == "validating_files" and job.model == "fake-base" and job.training_file == f.id
    assert job.hyperparameters.n_epochs == 2 and job.user_provided_suffix == "tickets"
    assert c.fine_tuning.jobs.retrieve(job.id).id == job.id
    assert [j.id for j in c.fine_tuning.jobs.list(limit=5).data] == [job.id]
    # the newer `method` form is read the same way
    job2 = c.fine_tuning.jobs.create(model="fake-base", training_file=f.id, method={
        "type": "supervised", "supervised": {"hyperparameters": {"batch_size": 2}}})  # fmt: skip
    assert job2.hyperparameters.batch_size == 2
    page = c.fine_tuning.jobs.list(limit=1)
    assert [j.id for j in page.data] == [job2.id] and page.has_more

    cancelled = c.fine_tuning.jobs.cancel(job.id)
    assert cancelled.status == "cancelled" and cancelled.finished_at is not None
    with pytest.raises(openai.BadRequestError, match="already cancelled"):
        c.fine_tuning.jobs.cancel(job.id)
    events = [e.message for e in c.fine_tuning.jobs.list_events(job.id).data]
    assert events == ["Fine-tuning job cancelled", "Created fine-tuning job"]  # newest first
    assert c.fine_tuning.jobs.checkpoints.list(job.id).data == []

    with pytest.raises(openai.ConflictError, match="has not ended"):  # job2 still needs it
        c.files.delete(f.id)
    c.fine_tuning.jobs.cancel(job2.id)
    assert c.files.delete(f.id).deleted
    with pytest.raises(openai.NotFoundError):
        c.files.retrieve(f.id)


def _error(e: openai.APIStatusError) -> dict:
    return e.response.json()["error"]


@pytest.mark.parametrize(
    "content,purpose,status,param,message",
    [
        (JSONL + b"{not json\n" + b'{"text": 1}\n', "fine-tune", 400, "file", "2 bad line(s): line 7: bad JSON"),
        (JSONL, "assistants", 400, "purpose", "purpose: must be one of fine-tune"),
        (b"x" * 5000, "fine-tune", 413, "file", "over the 4096-byte limit"),
        (b"", "fine-tune", 400, "file", "has no examples"),
        (b"\xff\xfe", "fine-tune", 400, "file", "not UTF-8"),
    ],
)
def test_bad_uploads_are_refused_and_nothing_is_stored(gw, content, purpose, status, param, message):
    c = client(gw)
    with pytest.raises(openai.APIStatusError) as e:
        c.files.create(file=("train.jsonl", content), purpose=purpose)
    err = _error(e.value)
    assert e.value.status_code == status and err["param"] == param and message in err["message"]
    assert c.files.list().data == []


def test_bad_jobs_name_the_field_and_nothing_is_created(gw):
    c, other = client(gw), client(gw, "globex")
    mine = c.files.create(file=("t.jsonl", JSONL), purpose="fine-tune").id
    theirs = other.files.create(file=("t.jsonl", JSONL), purpose="fine-tune").id
    cases = [
        ({"model": "gpt-4o", "training_file": mine}, "model", "cannot be fine-tuned here"),
        ({"model": "plain", "training_file": mine}, "model", "cannot be fine-tuned here"),
        ({"model": "fake-base", "training_file": "file-nope"}, "training_file", "no file 'file-nope'"),
        ({"model": "fake-base", "training_file": mine, "validation_file": theirs}, "validation_file", "no file"),
        ({"model": "fake-base", "training_file": mine, "hyperparameters": {"n_epochs": 0}},
         "hyperparameters.n_epochs", "1-50"),
        ({"model": "fake-base", "training_file": mine, "hyperparameters": {"learning_rate_multiplier": 99}},
         "hyperparameters.learning_rate_multiplier", "(0, 10]"),
        ({"model": "fake-base", "training_file": mine, "suffix": "no spaces"}, "suffix", "letters, digits"),
        ({"model": "fake-base", "training_file": mine, "extra_body": {"scorer": "bleu"}}, "scorer", "valid scorers"),
    ]  # fmt: skip
    for body, param, message in cases:
        with pytest.raises(openai.BadRequestError) as e:
            c.fine_tuning.jobs.create(**body)
        err = _error(e.value)
        assert err["param"] == param and message in err["message"], (body, err)
    assert c.fine_tuning.jobs.list().data == []


def test_a_tenant_sees_only_its_own_files_and_jobs(gw):
    acme, globex = client(gw), client(gw, "globex")
    f = acme.files.create(file=("t.jsonl", JSONL), purpose="fine-tune")
    job = acme.fine_tuning.jobs.create(model="fake-base", training_file=f.id)
    assert globex.files.list().data == [] and globex.fine_tuning.jobs.list().data == []
    # another tenant's ids answer exactly like ids that do not exist
    for call, known, unknown in [
        (globex.files.retrieve, f.id, "file-doesnotexist"),
        (globex.files.delete, f.id, "file-doesnotexist"),
        (lambda i: globex.files.content(i), f.id, "file-doesnotexist"),
        (globex.fine_tuning.jobs.retrieve, job.id, "ftjob-doesnotexist"),
        (globex.fine_tuning.jobs.cancel, job.id, "ftjob-doesnotexist"),
        (globex.fine_tuning.jobs.list_events, job.id, "ftjob-doesnotexist"),
        (globex.fine_tuning.jobs.checkpoints.list, job.id, "ftjob-doesnotexist"),
    ]:
        with pytest.raises(openai.NotFoundError) as a:
            call(known)
        with pytest.raises(openai.NotFoundError) as b:
            call(unknown)
        assert _error(a.value)["code"] == _error(b.value)["code"] == "not_found"
        assert _error(a.value)["message"].replace(known, "ID") == _error(b.value)["message"].replace(unknown, "ID")
    assert (
        acme.fine_tuning.jobs.retrieve(job.id).status == "validating_files"
    )  # untouched by the other tenant's attempts
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{gw.url}/v1", api_key="sk-wrong", max_retries=0).files.list()
