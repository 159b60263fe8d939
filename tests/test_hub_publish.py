"""Publishing to a private Hub org: the real huggingface_hub client against tests/hub_server.py on loopback."""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path

import httpx
import pytest
import yaml
from conftest import write_release_record

from pipeline_config import load_config, validate_config
from tasks import publish
from tasks.lib import hub
from tasks.lib.hub import HubError
from tests.hub_server import HubServer

TOKEN = "hf_" + secrets.token_hex(16)  # the only write token the server knows
READ_TOKEN = "hf_" + secrets.token_hex(16)
OTHER_TOKEN = "hf_" + secrets.token_hex(16)  # a valid user outside the org


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = HubServer({TOKEN: {"user": "alice", "orgs": ["acme"], "role": "write"},
                     READ_TOKEN: {"user": "rita", "orgs": ["acme"], "role": "read"},
                     OTHER_TOKEN: {"user": "mallory", "orgs": ["elsewhere"], "role": "write"}},
                    tmp_path_factory.mktemp("hub")).start()
    yield srv
    srv.stop()


@pytest.fixture(autouse=True)
def online(monkeypatch, server):
    """The write token of the loopback server's org (the tests talk to that server only)."""
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    server.state.faults.clear()


def make_cfg(server, repo: str, **publish):
    return validate_config({
        "data": {"train_path": "t.jsonl", "eval_path": "e.jsonl"},
        "model": {"base": "m", "name": "tiny"},
        "publish": {"repo": "local-name", "target": f"hf://{repo}", "endpoint": server.url, "transfer": "lfs",
                    **publish},
    })


def make_bundle(path: Path, release_hash: str, fingerprint: str = "ab" * 32, size: int = 300_000) -> Path:
    path.mkdir(parents=True)
    (path / "model.safetensors").write_bytes(os.urandom(size))
    (path / "config.json").write_text(json.dumps({"quantization_config": {"quant_method": "gptq"}}))
    (path / "adapter").mkdir()
    (path / "adapter" / "adapter_config.json").write_text("{}")
    (path / "README.md").write_text("---\nbase_model: tiny\n---\n# card\n")
    write_release_record(path, release_hash, fingerprint)
    return path


def repo(server, repo_id):
    return server.state.repos[repo_id]


def main_history(server, repo_id) -> list[str]:
    r = repo(server, repo_id)
    oid, out = r.branches["main"], []
    while oid:
        out.append(oid)
        oid = r.commits[oid].parent
    return out


def test_first_publish_then_identical_republish_makes_nothing(server, tmp_path):
    cfg = make_cfg(server, "acme/first")
    bundle = make_bundle(tmp_path / "b1", "1" * 64)
    before = len(server.state.requests)

    first = publish.publish_to_hub(cfg, bundle)
    assert first.created and first.tag == "v1-abababab"
    r = repo(server, "acme/first")
    assert r.private  # created private
    assert r.tags == {"v1-abababab": first.commit} and r.branches["main"] == first.commit
    files = r.commits[first.commit].files
    assert set(files) == {".gitattributes", "model.safetensors", "config.json", "adapter/adapter_config.json",
                          "README.md", "release.json"}
    assert files["model.safetensors"].lfs_oid and files["config.json"].content is not None  # LFS for the weights
    paths = [p for _, p, _ in server.state.requests[before:]]
    assert "/acme/first.git/info/lfs/objects/batch" in paths
    assert sum(p.startswith("/_lfs/acme/first/upload/") for p in paths) == 1
    assert sum(p.startswith("/api/models/acme/first/commit/") for p in paths) == 1

    # The published files read back through the client at the tag, bit for bit.
    from huggingface_hub import HfApi

    api = HfApi(endpoint=server.url, token=TOKEN)
    got = api.hf_hub_download("acme/first", "model.safetensors", revision=first.tag, cache_dir=tmp_path / "dl")
    assert Path(got).read_bytes() == (bundle / "model.safetensors").read_bytes()

    commits, mark = len(r.commits), len(server.state.requests)
    again = publish.publish_to_hub(cfg, bundle)
    assert not again.created and again.tag == first.tag and "no new commit" in again.message
    assert len(r.commits) == commits and list(r.tags) == ["v1-abababab"]
    assert not any(m == "POST" and ("/commit/" in p or "/tag/" in p or "lfs" in p)
                   for m, p, _ in server.state.requests[mark:])

    # A different release becomes v2: one commit, the files of the old one that it lacks removed.
    bundle2 = make_bundle(tmp_path / "b2", "2" * 64)
    (bundle2 / "adapter" / "adapter_config.json").unlink()
    second = publish.publish_to_hub(cfg, bundle2)
    assert second.created and second.tag == "v2-abababab" and len(main_history(server, "acme/first")) == 3
    assert "adapter/adapter_config.json" not in r.commits[second.commit].files


@pytest.mark.parametrize("op,mode,times", [
    ("lfs_upload", "drop", 6),          # the connection drops on every attempt of the client's own backoff
    ("commit", "500", 1),               # the commit request fails
    ("commit", "drop_after_apply", 1),  # the commit lands but its response is lost
    ("tag", "500", 1),                  # the commit lands, the tag fails
])
def test_failure_mid_upload_then_retry_gives_exactly_one_release(server, tmp_path, op, mode, times):
    repo_id = f"acme/fault-{op.replace('_', '-')}-{mode.replace('_', '-')}"
    cfg = make_cfg(server, repo_id)
    bundle = make_bundle(tmp_path / "b", "3" * 64)
    server.inject(op, mode, times=times)

    with pytest.raises(HubError) as failure:
        publish.publish_to_hub(cfg, bundle)
    assert TOKEN not in str(failure.value) and failure.value.__context__ is None
    r = repo(server, repo_id)
    assert r.tags == {}  # no tag, so no visible release
    landed = op in ("tag",) or mode == "drop_after_apply"
    assert len(main_history(server, repo_id)) == (2 if landed else 1)

    retry = publish.publish_to_hub(cfg, bundle)  # what the task's retry does
    assert retry.created and list(r.tags) == ["v1-abababab"]
    assert len(main_history(server, repo_id)) == 2  # exactly one release commit on top of the initial one
    assert r.tags["v1-abababab"] == r.branches["main"] == retry.commit
    assert publish.publish_to_hub(cfg, bundle).created is False


def test_refuses_public_repo_unless_allowed(server, tmp_path):
    server.create_repo("acme/public-model", private=False)
    cfg = make_cfg(server, "acme/public-model")
    with pytest.raises(HubError, match="PUBLIC repo; refusing"):
        hub.preflight(cfg)
    with pytest.raises(HubError, match="PUBLIC repo; refusing"):
        publish.publish_to_hub(cfg, make_bundle(tmp_path / "b", "4" * 64))
    assert len(main_history(server, "acme/public-model")) == 1 and repo(server, "acme/public-model").tags == {}

    allowed = make_cfg(server, "acme/public-model", allow_public=True)
    assert publish.publish_to_hub(allowed, tmp_path / "b").created


def test_preflight_finds_token_problems_with_clear_errors(server, monkeypatch):
    cfg = make_cfg(server, "acme/pre")
    assert hub.preflight(cfg).model_dump() == {"user": "alice", "repo": "acme/pre", "repo_exists": False}

    bad = "hf_" + secrets.token_hex(16)
    monkeypatch.setenv("HF_TOKEN", bad)
    with pytest.raises(HubError, match=r"token rejected .*401.*HF_TOKEN is invalid") as rejected:
        hub.preflight(cfg)
    assert bad not in str(rejected.value) and rejected.value.__context__ is None

    monkeypatch.delenv("HF_TOKEN")
    with pytest.raises(HubError, match="Hub token missing"):
        hub.preflight(cfg)
    monkeypatch.setenv("HF_TOKEN", READ_TOKEN)
    with pytest.raises(HubError, match="read-only"):
        hub.preflight(cfg)
    monkeypatch.setenv("HF_TOKEN", OTHER_TOKEN)
    with pytest.raises(HubError, match="not a member of 'acme'"):
        hub.preflight(cfg)


def test_token_from_a_prefect_secret_block(server, monkeypatch):
    from prefect.blocks.system import Secret

    name = f"hf-token-{secrets.token_hex(4)}"
    Secret(value=TOKEN).save(name, overwrite=True)
    monkeypatch.delenv("HF_TOKEN")
    assert hub.preflight(make_cfg(server, "acme/secret", token_secret=name)).user == "alice"
    with pytest.raises(HubError, match="could not load Prefect Secret block 'no-such-block'"):
        hub.preflight(make_cfg(server, "acme/secret", token_secret="no-such-block"))


def test_private_repo_is_401_without_a_valid_token(server, tmp_path):
    publish.publish_to_hub(make_cfg(server, "acme/private"), make_bundle(tmp_path / "b", "5" * 64))
    for headers in ({}, {"authorization": "Bearer hf_wrong"}):
        for path in ("/api/models/acme/private", "/acme/private/resolve/main/release.json",
                     "/api/models/acme/private/refs", "/api/models/acme/private/tree/main"):
            assert httpx.get(server.url + path, headers=headers).status_code == 401, (headers, path)
    from huggingface_hub import HfApi
    from huggingface_hub.errors import RepositoryNotFoundError

    with pytest.raises(RepositoryNotFoundError):
        HfApi(endpoint=server.url, token=False).repo_info("acme/private")
    assert HfApi(endpoint=server.url, token=TOKEN).repo_info("acme/private").private is True


# -- the real flow ---------------------------------------------------------------------------------
def flow_logs(flow_run_id) -> list[str]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.logging.handlers import APILogHandler

    APILogHandler().flush()
    messages: list[str] = []
    with get_client(sync_client=True) as client:
        while page := client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])),
                                       limit=200, offset=len(messages)):
            messages += [log.message for log in page]
    return messages


def task_runs(flow_run_id):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        return client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))


@pytest.fixture
def prefect_auth_string(monkeypatch):
    """A Prefect API auth string set for this process's client, as a worker of an authenticated server has it
    (the session's server accepts the header; the point is that it is held and sent, and never written)."""
    import prefect.context

    auth = "qlora-admin:" + secrets.token_urlsafe(24)
    monkeypatch.setenv("PREFECT_API_AUTH_STRING", auth)
    prefect.context.refresh_global_settings_context()
    yield auth
    monkeypatch.delenv("PREFECT_API_AUTH_STRING")
    prefect.context.refresh_global_settings_context()


@pytest.mark.slow
def test_flow_publishes_to_private_hub_with_retry_and_never_shows_the_token(server, tiny_config, tmp_path,
                                                                             capfd, caplog, monkeypatch,
                                                                             s3_endpoint, prefect_auth_string):
    """... nor any other secret the run holds: the Prefect API auth string and the S3 credentials of the
    artifact store (moto's S3 server here), each searched for in every log, stored object, card and record."""
    import base64

    from flows.cli import main as cli
    from flows.pipeline import qlora_pipeline

    store_root = "s3://qlora-artifacts/secrets"
    hub_set = ["publish.target=hf://acme/tiny", f"publish.endpoint={server.url}", "publish.transfer=lfs",
               f"artifacts.root={store_root}"]
    secret_values = [TOKEN, prefect_auth_string, base64.b64encode(prefect_auth_string.encode()).decode(),
                     os.environ["AWS_ACCESS_KEY_ID"], os.environ["AWS_SECRET_ACCESS_KEY"]]

    # A rejected token fails the run at preflight, before any training.
    monkeypatch.setenv("HF_TOKEN", "hf_" + secrets.token_hex(16))
    state = qlora_pipeline(config=str(tiny_config), overrides=hub_set, return_state=True)
    assert state.is_failed() and "token rejected" in state.message
    assert {t.name.rsplit("-", 1)[0] for t in task_runs(state.state_details.flow_run_id)} == {"preflight"}
    monkeypatch.setenv("HF_TOKEN", TOKEN)

    # The first commit attempt gets a 500: the publish task's retry completes exactly one release.
    server.inject("commit", "500")
    state = qlora_pipeline(config=str(tiny_config), overrides=hub_set, return_state=True)
    assert state.is_completed(), state.message
    flow_run_id = state.state_details.flow_run_id
    release = state.result().release
    cfg = load_config(tiny_config)
    data_fp = state.result().stages[0].ref.sha256
    assert release.created and release.version == f"v1-{data_fp[:8]}" and release.path.startswith("hf://acme/tiny@")
    r = repo(server, "acme/tiny")
    assert r.private and list(r.tags) == [release.version] and len(main_history(server, "acme/tiny")) == 2
    publish_runs = [t for t in task_runs(flow_run_id) if t.name.startswith("publish")]
    assert publish_runs[0].run_count == 2  # failed once, retried

    files = r.commits[r.tags[release.version]].files
    assert files["model.safetensors"].lfs_oid and "adapter/adapter_model.safetensors" in files
    card = files["README.md"].content.decode()
    assert card.startswith("---\n") and "base_model: tiny-llama" in card and "gptq-perplexity-increase" in card
    for needle in (data_fp, str(flow_run_id), "pipeline_version", "git_commit", '"approval"',
                   f'repo, revision = "acme/tiny", "v<N>-{data_fp[:8]}"', "lora:", "train.jsonl"):
        assert needle in card, needle
    record = json.loads(files["release.json"].content)
    assert record["release_hash"] == release.release_hash and record["data_artifact"] == data_fp

    # `qlora-pipeline publish --release` re-publishes the bundle: nothing new on the same repo ...
    config_path = tmp_path / "hub.yaml"
    raw = yaml.safe_load(Path(tiny_config).read_text())
    raw["publish"].update(target="hf://acme/tiny", endpoint=server.url, transfer="lfs")
    config_path.write_text(yaml.safe_dump(raw))
    assert cli(["publish", "--config", str(config_path), "--release", release.bundle]) == 0
    assert "already published" in capfd.readouterr().out and list(r.tags) == [release.version]
    # ... and a full release on another repo, training nothing.
    assert cli(["publish", "--config", str(config_path), "--set", "publish.target=hf://acme/tiny-copy",
                "--release", release.bundle]) == 0
    assert list(repo(server, "acme/tiny-copy").tags) == [release.version]

    # The token is nowhere: Prefect logs, flow parameters, task states, Prefect artifacts and database,
    # the artifact store, the registry, what was uploaded, captured output and log records.
    from prefect.client.orchestration import get_client

    haystacks = flow_logs(flow_run_id) + [r.getMessage() for r in caplog.records]
    out, err = capfd.readouterr()
    haystacks += [out, err]
    with get_client(sync_client=True) as client:
        run = client.read_flow_run(flow_run_id)
        haystacks.append(json.dumps(run.parameters, default=str))
        haystacks += [str(t.state.message) for t in task_runs(flow_run_id)]
        haystacks += [json.dumps(a.data, default=str) for a in client.read_artifacts()]
    assert len(flow_logs(flow_run_id)) > 10
    stored = {o["Key"]: s3_endpoint.get_object(Bucket="qlora-artifacts", Key=o["Key"])["Body"].read()
              for o in s3_endpoint.list_objects_v2(Bucket="qlora-artifacts")["Contents"]}
    assert any(key.endswith("/release.json") for key in stored) and any(key.endswith("/README.md") for key in stored)
    local = [Path(cfg.artifacts.root), Path(cfg.publish.registry), Path(os.environ["PREFECT_HOME"]),
             Path(os.environ["QLORA_PIPELINE_CACHE"])]
    files = {str(p): p.read_bytes() for root in local if root.exists() for p in root.rglob("*") if p.is_file()}
    uploaded = {f"{c}:{n}": e.content for c, commit in r.commits.items() for n, e in commit.files.items() if e.content}
    assert any(name.endswith(":release.json") for name in uploaded)
    for secret in secret_values:
        for where, data in {**stored, **files, **uploaded}.items():
            assert secret.encode() not in data, where
        for text in haystacks:
            assert secret not in text
    # (and each was used: the scan looks for the right strings)
    assert any(auth == f"Bearer {TOKEN}" for _, _, auth in server.state.requests)
    assert stored and store_root in release.bundle
    from prefect.settings import PREFECT_API_AUTH_STRING

    assert PREFECT_API_AUTH_STRING.value() == prefect_auth_string  # what every client of this process sends


def test_a_push_killed_halfway_sends_again_only_the_file_it_was_sending(server, tmp_path):
    """A publish process killed (SIGKILL) when half of a 4-shard release has reached the Hub: the next push sends
    only what the Hub does not hold whole, the shard in flight and those after it, never a finished one again."""
    import signal
    import subprocess
    import sys
    import time

    shard = 150_000_000
    bundle = make_bundle(tmp_path / "big", "b" * 64, size=1)
    (bundle / "model.safetensors").unlink()
    for number in range(1, 5):
        with open(bundle / f"model-{number:05d}-of-00004.safetensors", "wb") as f:
            for _ in range(0, shard, 2**24):
                f.write(os.urandom(2**24))
            f.truncate(shard)
    total = 4 * shard
    script = ("import sys; from pathlib import Path; from pipeline_config import validate_config; "
              "from tasks import publish; cfg = validate_config({'data': {'train_path': 't', 'eval_path': 'e'}, "
              "'model': {'base': 'm', 'name': 'tiny'}, 'publish': {'repo': 'x', 'target': 'hf://acme/killed', "
              f"'endpoint': {server.url!r}, 'transfer': 'lfs'}}}}); publish.publish_to_hub(cfg, Path(sys.argv[1]))")
    before = server.state.lfs_received_bytes
    child = subprocess.Popen([sys.executable, "-c", script, str(bundle)], env={**os.environ, "HF_TOKEN": TOKEN})
    deadline = time.monotonic() + 300
    while server.state.lfs_received_bytes - before < total / 2 and child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    child.send_signal(signal.SIGKILL)
    child.wait()
    settled = None  # the bytes already on their way when the client died still arrive: wait until none do
    while settled != server.state.lfs_received_bytes:
        settled = server.state.lfs_received_bytes
        time.sleep(0.5)
    first = settled - before
    assert total / 2 <= first < total, first  # killed halfway, not after the push
    assert "acme/killed" not in server.state.repos or not repo(server, "acme/killed").tags

    before = server.state.lfs_received_bytes
    release = publish.publish_to_hub(make_cfg(server, "acme/killed"), bundle)
    second = server.state.lfs_received_bytes - before
    assert release.created and release.tag.startswith("v1-")
    assert second == total - (first // shard) * shard, (first, second)  # the whole shards received are not sent again
