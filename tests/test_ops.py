"""Operations (issue 8): the authenticated server recipe, the data sensor, the per-target concurrency limit,
and the Kubernetes work pool files. Everything here runs against real Prefect servers; no model is trained."""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
from pathlib import Path

import httpx
import pytest
from conftest import (
    POOL,
    REPO,
    VENV_BIN,
    free_port,
    prefect_cli,
    stop,
    wait_http,
    write_config,
)

AUTH = "qlora-admin:correct-horse-battery-staple"


# -- 1. access: deploy/run-server.sh starts an authenticated API on loopback --------------------------------
def server_env(home: Path, port: int, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(home), PREFECT_SERVER_API_PORT=str(port), PREFECT_BIN=str(VENV_BIN / "prefect"),
               PREFECT_LOGGING_LEVEL="WARNING", **extra)
    return env


def test_server_recipe_refuses_to_start_without_an_auth_string(tmp_path):
    env = server_env(tmp_path, free_port(), PREFECT_SERVER_API_AUTH_STRING_FILE=str(tmp_path / "missing"))
    done = subprocess.run([str(REPO / "deploy" / "run-server.sh")], env=env, capture_output=True, text=True,
                          timeout=30)
    assert done.returncode == 2 and "no auth string" in done.stderr
    weak = subprocess.run([str(REPO / "deploy" / "run-server.sh")], capture_output=True, text=True, timeout=30,
                          env={**env, "PREFECT_SERVER_API_AUTH_STRING": "admin:short"})
    assert weak.returncode == 2 and "16 characters" in weak.stderr


def test_server_recipe_requires_credentials_on_the_api(tmp_path):
    port = free_port()
    secret_file = tmp_path / "auth-string"
    secret_file.write_text(AUTH + "\n")
    secret_file.chmod(0o600)
    env = server_env(tmp_path / "home", port, PREFECT_SERVER_API_AUTH_STRING_FILE=str(secret_file))
    log = open(tmp_path / "server.log", "wb")
    server = subprocess.Popen([str(REPO / "deploy" / "run-server.sh")], env=env, stdout=log,
                              stderr=subprocess.STDOUT, start_new_session=True)
    try:
        api = f"http://127.0.0.1:{port}/api"
        wait_http(f"{api}/health", timeout=120, process=server)  # /health and /ready stay open (probes)
        cmdline = Path(f"/proc/{server.pid}/cmdline").read_bytes().split(b"\0")
        assert cmdline[cmdline.index(b"--host") + 1] == b"127.0.0.1"  # the script exec'd prefect on loopback

        def basic(credentials: str) -> dict[str, str]:
            return {"Authorization": "Basic " + base64.b64encode(credentials.encode()).decode()}

        for headers in ({}, basic("qlora-admin:wrong-password-here"), {"Authorization": "Bearer " + AUTH}):
            assert httpx.post(f"{api}/flows/filter", json={}, headers=headers).status_code == 401
            assert httpx.get(f"{api}/admin/version", headers=headers).status_code == 401
        assert httpx.post(f"{api}/flows/filter", json={}, headers=basic(AUTH)).status_code == 200
        assert httpx.get(f"{api}/admin/version", headers=basic(AUTH)).status_code == 200

        # A real Prefect client with the matching PREFECT_API_AUTH_STRING gets in; without it, it does not.
        from prefect.client.orchestration import SyncPrefectClient

        with SyncPrefectClient(api, auth_string=AUTH) as client:
            assert client.read_flows() == []
        with SyncPrefectClient(api) as client, pytest.raises(httpx.HTTPStatusError, match="401"):
            client.read_flows()
    finally:
        stop(server)


# -- deployments registered on the session's server, without a worker (scheduled runs stay Scheduled) ------
@pytest.fixture
def deployed():
    created = prefect_cli("work-pool", "create", POOL, "--type", "process", "--overwrite")
    assert created.returncode == 0, created.stdout + created.stderr
    done = prefect_cli("--no-prompt", "deploy", "--prefect-file", "deploy/prefect.yaml", "--all")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "qlora-data-sensor/every-15-min" in done.stdout, done.stdout


@pytest.fixture
def ops_config(tmp_path, assets) -> Path:
    """A config whose data files are copies this test may edit; nothing in it gets trained."""
    data = tmp_path / "data"
    data.mkdir()
    for name in ("train.jsonl", "eval.jsonl"):
        shutil.copy(assets["data"] / name, data / name)
    return write_config(
        tmp_path / "ops.yaml", run_name="ops",
        data={"train_path": str(data / "train.jsonl"), "eval_path": str(data / "eval.jsonl"),
              "contract": str(REPO / "data_contracts" / "alpaca.json")},
        model={"base": str(assets["model"]), "name": "smollm2"},
        publish={"registry": str(tmp_path / "registry"), "repo": "ops-release"},
        artifacts={"root": str(tmp_path / "artifacts")},
    )


def pipeline_runs() -> list:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        DeploymentFilter,
        DeploymentFilterName,
        FlowFilter,
        FlowFilterName,
    )

    with get_client(sync_client=True) as client:
        return client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=["qlora-pipeline"])),
                                     deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=["on-demand"])))


def fake_release(cfg, version: str, source_hash: str) -> None:
    """What publish_local leaves in the registry, reduced to what the release lookup reads."""
    repo = Path(cfg.publish.registry) / cfg.publish.repo
    (repo / version).mkdir(parents=True)
    (repo / version / "release.json").write_text(json.dumps({"data_source_hash": source_hash,
                                                             "release_hash": version * 16}))
    (repo / version / "metrics.json").write_text("{}")
    (repo / "LATEST").write_text(version + "\n")


# -- 2. the data sensor ----------------------------------------------------------------------------------
def test_sensor_starts_the_pipeline_once_for_changed_data_and_never_for_unchanged(deployed, ops_config):
    from prefect.client.orchestration import get_client

    from flows.sensor import qlora_data_sensor, source_tag
    from pipeline_config import load_config
    from tasks.lib.lineage import data_source_hash

    cfg = load_config(ops_config)
    before = {r.id for r in pipeline_runs()}
    started = []
    try:
        assert qlora_data_sensor(config=str(ops_config)).action == "no-release"  # never bootstraps a registry

        fake_release(cfg, "v1", data_source_hash(cfg))
        unchanged = qlora_data_sensor(config=str(ops_config))
        assert unchanged.action == "unchanged" and unchanged.source_hash == unchanged.released_source_hash
        assert {r.id for r in pipeline_runs()} == before

        train = Path(cfg.data.train_path)
        train.write_text(train.read_text() + json.dumps(
            {"instruction": "What is a data sensor?", "input": "", "output": "A flow that watches data."}) + "\n")
        changed = qlora_data_sensor(config=str(ops_config))
        new = [r for r in pipeline_runs() if r.id not in before]
        started = [r.id for r in new]
        assert changed.action == "started" and [str(r.id) for r in new] == [changed.flow_run_id]
        run = new[0]
        assert run.state_type.value == "SCHEDULED"  # no worker here: it waits in the qlora-cpu pool
        assert run.parameters == {"config": str(ops_config), "overrides": []}
        assert source_tag(changed.source_hash) in run.tags

        # The next tick, while that run has not finished, starts nothing.
        again = qlora_data_sensor(config=str(ops_config))
        assert again.action == "already-started" and again.flow_run_id == changed.flow_run_id
        assert len([r for r in pipeline_runs() if r.id not in before]) == 1

        # Once a release from the new data is published, the sensor is quiet again.
        fake_release(cfg, "v2", changed.source_hash)
        assert qlora_data_sensor(config=str(ops_config)).action == "unchanged"
    finally:  # leave no Scheduled pipeline run for a worker in a later test to pick up
        with get_client(sync_client=True) as client:
            for run_id in started:
                client.delete_flow_run(run_id)


def test_sensor_sees_a_new_commit_of_a_hub_data_file(deployed, ops_config, tmp_path, monkeypatch):
    """data.train_path names a file of a private Hub dataset at `main` (tests/hub_server.py). The release records
    the fingerprint of the file the fetch downloaded; the sensor, from the user's config, resolves `main` to its
    commit: the same fingerprint, so it waits; a push to `main` makes a new commit, and the next tick starts a run."""
    import secrets

    from huggingface_hub import HfApi
    from prefect.client.orchestration import get_client

    from flows.sensor import qlora_data_sensor
    from pipeline_config import load_config
    from tasks.lib.hub_sources import download_data_file, resolve_revisions, with_data_files
    from tasks.lib.lineage import data_source_hash
    from tests.hub_server import HubServer

    token = "hf_" + secrets.token_hex(16)
    server = HubServer({token: {"user": "alice", "orgs": ["acme"], "role": "write"}}, tmp_path / "hub").start()
    started = []
    try:
        api = HfApi(endpoint=server.url, token=token)
        api.create_repo("acme/chat", repo_type="dataset", private=True)
        train = load_config(ops_config).data.train_path
        api.upload_file(path_or_fileobj=train, path_in_repo="data/train.jsonl", repo_id="acme/chat",
                        repo_type="dataset", commit_message="first rows")
        monkeypatch.setenv("HF_TOKEN", token)  # what the README tells a user with a private dataset to set
        overrides = ["data.train_path=acme/chat@main:data/train.jsonl", f"publish.endpoint={server.url}"]
        cfg = load_config(ops_config, overrides)

        # What publish records: the fingerprint of the config the stages after the fetch see.
        source = resolve_revisions(cfg)["train_path"]
        download_data_file(cfg, source, tmp_path / "fetched")
        fetched = with_data_files(cfg, {"train_path": tmp_path / "fetched" / "data" / "train.jsonl"})
        fake_release(cfg, "v1", data_source_hash(fetched))

        before = {r.id for r in pipeline_runs()}
        unchanged = qlora_data_sensor(config=str(ops_config), overrides=overrides)
        assert unchanged.action == "unchanged", unchanged
        assert {r.id for r in pipeline_runs()} == before

        rows = Path(train).read_text() + json.dumps(
            {"instruction": "What is a commit?", "input": "", "output": "A snapshot of a repository."}) + "\n"
        api.upload_file(path_or_fileobj=rows.encode(), path_in_repo="data/train.jsonl", repo_id="acme/chat",
                        repo_type="dataset", commit_message="one more row")
        assert api.dataset_info("acme/chat").sha != source.commit
        changed = qlora_data_sensor(config=str(ops_config), overrides=overrides)
        started = [r.id for r in pipeline_runs() if r.id not in before]
        assert changed.action == "started" and [str(r) for r in started] == [changed.flow_run_id], changed

        # A config pinned to the released commit does not see the push.
        pinned = [f"data.train_path=acme/chat@{source.commit}:data/train.jsonl", overrides[1]]
        assert qlora_data_sensor(config=str(ops_config), overrides=pinned).action == "unchanged"
    finally:
        server.stop()
        with get_client(sync_client=True) as client:
            for run_id in started:
                client.delete_flow_run(run_id)


# -- 3. one run at a time per publish target ---------------------------------------------------------------
def test_a_second_run_on_a_held_target_fails_before_any_stage(ops_config, tmp_path):
    from prefect.concurrency.sync import concurrency

    from flows.locking import ReleaseLocked, ensure_limit, limit_name, release_lock
    from flows.pipeline import qlora_pipeline
    from pipeline_config import load_config

    cfg = load_config(ops_config)
    name = limit_name(cfg)
    ensure_limit(name)
    with concurrency(name, occupy=1, strict=True):  # another run holds this target
        with pytest.raises(ReleaseLocked, match="another run is training or publishing .*ops-release"):
            qlora_pipeline(config=str(ops_config), overrides=["concurrency.mode=fail"])
        assert not Path(cfg.artifacts.root).exists()  # validate never ran

        with pytest.raises(ReleaseLocked, match="waited 1.5 s"):
            with release_lock(load_config(ops_config, ["concurrency.timeout_s=1.5"])):
                pass

        # Another publish target is not blocked.
        other = load_config(ops_config, [f"publish.registry={tmp_path / 'other-registry'}",
                                         "concurrency.mode=fail"])
        assert limit_name(other) != name
        with release_lock(other):
            pass

    with release_lock(load_config(ops_config, ["concurrency.mode=fail"])):  # free again once released
        pass


def test_without_a_server_a_killed_runs_slot_is_free_at_once(ops_config, tmp_path, monkeypatch):
    """`qlora-pipeline run` without PREFECT_API_URL starts a temporary server per run, which never expires a
    lease: the slot is an OS file lock instead, freed by the kernel when the holder is SIGKILLed."""
    import signal

    from flows.locking import ReleaseLocked, file_lock, limit_name
    from pipeline_config import load_config

    cache = tmp_path / "cache"
    monkeypatch.setenv("QLORA_PIPELINE_CACHE", str(cache))
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    holder = subprocess.Popen(
        [str(VENV_BIN / "python"), "-c", "import sys, time\n"
         "from flows.locking import release_lock\nfrom pipeline_config import load_config\n"
         "with release_lock(load_config(sys.argv[1])):\n    print('held', flush=True)\n    time.sleep(600)\n",
         str(ops_config)], env=env, cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        cfg = load_config(ops_config, ["concurrency.mode=fail"])
        with pytest.raises(ReleaseLocked, match=r"another run is training or publishing .*ops-release \(lock file"):
            with file_lock(cfg, limit_name(cfg)):
                pass
        with pytest.raises(ReleaseLocked, match="waited 1.5 s"):
            with file_lock(load_config(ops_config, ["concurrency.timeout_s=1.5"]), limit_name(cfg)):
                pass
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with file_lock(cfg, limit_name(cfg)):  # no lease to wait out
        pass


# -- 4. Kubernetes work pool: base job template, flow-run image, deployments --------------------------------
K8S_TEMPLATE = REPO / "deploy" / "k8s-base-job-template.json"


def rendered_job(values: dict | None = None) -> dict:
    """The job configuration a Kubernetes worker gets: the template with the variables' defaults applied."""
    from prefect.utilities.templating import apply_values

    template = json.loads(K8S_TEMPLATE.read_text())
    props = template["variables"]["properties"]
    defaults = {name: spec["default"] for name, spec in props.items() if "default" in spec}
    return apply_values(template["job_configuration"], {**defaults, **(values or {})})


def test_k8s_base_job_template_is_accepted_and_renders_a_gpu_job_with_cache_and_secrets():
    import jsonschema
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate

    template = json.loads(K8S_TEMPLATE.read_text())
    assert set(template) == {"job_configuration", "variables"}
    jsonschema.Draft7Validator.check_schema(template["variables"])
    defaults = {n: s["default"] for n, s in template["variables"]["properties"].items() if "default" in s}
    jsonschema.validate(defaults, template["variables"])

    # The Prefect server's own check (every {{ placeholder }} is a declared variable), on a real pool.
    with get_client(sync_client=True) as client:
        client.create_work_pool(WorkPoolCreate(name="qlora-gpu-template-check", type="kubernetes",
                                               base_job_template=template), overwrite=True)
        try:
            stored = client.read_work_pool("qlora-gpu-template-check")
            assert stored.base_job_template == template
        finally:
            client.delete_work_pool("qlora-gpu-template-check")

    job = rendered_job()
    manifest = job["job_manifest"]
    assert manifest["kind"] == "Job" and manifest["spec"]["backoffLimit"] == 0
    pod = manifest["spec"]["template"]["spec"]
    assert pod["restartPolicy"] == "Never" and pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    (container,) = pod["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert container["resources"]["requests"]["nvidia.com/gpu"] == 1
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert set(mounts) == set(volumes)
    assert mounts["qlora-cache"] == container["workingDir"] + "/.qlora"  # store, scratch checkpoints, registry
    assert volumes["qlora-cache"]["persistentVolumeClaim"]["claimName"] == "qlora-cache"
    secrets = {e["secretRef"]["name"] for e in container["envFrom"]}
    assert secrets == {"qlora-prefect-api", "qlora-hf-token"}  # API URL + auth string; HF_TOKEN
    assert "{{" not in json.dumps(job)

    sensor = rendered_job({"gpu_count": 0, "node_selector": {}})["job_manifest"]["spec"]["template"]["spec"]
    assert sensor["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 0


def test_k8s_deployments_and_dockerfile_fit_the_template():
    import yaml

    template = json.loads(K8S_TEMPLATE.read_text())
    k8s = yaml.safe_load((REPO / "deploy" / "prefect-k8s.yaml").read_text())
    local = yaml.safe_load((REPO / "deploy" / "prefect.yaml").read_text())
    workdir = k8s["pull"][0]["prefect.deployments.steps.set_working_directory"]["directory"]
    assert workdir == template["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]["containers"][0][
        "workingDir"]
    assert {d["entrypoint"] for d in k8s["deployments"]} == {d["entrypoint"] for d in local["deployments"]}
    for deployment in k8s["deployments"]:
        assert set(deployment["work_pool"]["job_variables"]) <= set(template["variables"]["properties"])
        rendered_job(deployment["work_pool"]["job_variables"])
    sensor = next(d for d in k8s["deployments"] if d["entrypoint"].startswith("flows/sensor.py"))
    assert sensor["parameters"]["deployment"] == "qlora-pipeline/" + next(
        d["name"] for d in k8s["deployments"] if d["entrypoint"].startswith("flows/pipeline.py"))

    # Dockerfile: a parse of its instructions (no Docker engine here).
    lines, current = [], ""
    for raw in (REPO / "deploy" / "Dockerfile").read_text().splitlines():
        if not current and (not raw.strip() or raw.lstrip().startswith("#")):
            continue
        current += raw.rstrip("\\").strip() + " "
        if not raw.rstrip().endswith("\\"):
            lines.append(current.strip())
            current = ""
    instructions = [line.split(None, 1) for line in lines]
    known = {"FROM", "ARG", "ENV", "RUN", "WORKDIR", "COPY", "USER", "CMD", "LABEL", "EXPOSE", "ENTRYPOINT"}
    assert all(op in known for op, _ in instructions), instructions
    assert instructions[0][0] == "FROM" and "python:3.11" in instructions[0][1]
    assert ["WORKDIR", workdir] in instructions
    for source in ("requirements.lock", "pipeline_config/", "tasks/", "flows/", "data_contracts/"):
        assert any(op == "COPY" and source in args for op, args in instructions), source
        assert (REPO / source.rstrip("/")).exists()
    torch_pin = next(line for line in (REPO / "requirements.lock").read_text().splitlines()
                     if line.startswith("torch=="))
    assert f"ARG TORCH_VERSION={torch_pin.split('==')[1].split('+')[0]}" in lines  # same torch, CUDA build


# -- 5. the artifact store on S3 (moto in server mode, the s3_endpoint fixture in conftest.py) -------------
def test_artifact_store_on_s3_seals_objects_and_serves_cache_hits(s3_endpoint, ops_config, tmp_path):
    from pipeline_config import load_config
    from tasks.lib.artifacts import MANIFEST, ArtifactStore
    from tasks.validate import validate_task

    root = "s3://qlora-artifacts/team/artifacts"
    cfg = load_config(ops_config, [f"artifacts.root={root}", "data.max_seq_len=128"])

    first = validate_task(cfg).result()
    assert not first.cache_hit and first.ref.uri == f"{root}/objects/{first.ref.sha256}"
    keys = {o["Key"] for o in s3_endpoint.list_objects_v2(Bucket="qlora-artifacts", Prefix="team/")["Contents"]}
    prefix = f"team/artifacts/objects/{first.ref.sha256}/"
    assert {prefix + MANIFEST, prefix + "train.jsonl", prefix + "train_tokens.npz"} <= keys
    assert any(k.startswith("team/artifacts/index/validate/") for k in keys)

    again = validate_task(cfg).result()  # a second run finds the index entry and the sealed object in the bucket
    assert again.cache_hit and again.ref == first.ref

    fresh = ArtifactStore(root, local_cache=tmp_path / "other-cache")  # another machine: downloads it once
    manifest = json.loads((fresh.local_path(first.ref) / MANIFEST).read_text())
    assert manifest["sha256"] == first.ref.sha256 and "eval.jsonl" in manifest["files"]


# -- 6. a worker dies mid-training; a fresh worker on another "machine" resumes from object storage ----------
def start_worker(log: Path, cache_dir: Path) -> subprocess.Popen:
    """A process worker whose flow runs see an empty local disk cache (its own ~/.cache: another machine)."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(
        [str(VENV_BIN / "prefect"), "worker", "start", "--pool", POOL, "--type", "process", "--prefetch-seconds", "1"],
        cwd=REPO, stdout=open(log, "wb"), stderr=subprocess.STDOUT, start_new_session=True,
        env={**os.environ, "PATH": f"{VENV_BIN}:{os.environ['PATH']}", "QLORA_PIPELINE_CACHE": str(cache_dir)},
    )


def descendants(pid: int) -> set[int]:
    parent_of = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent_of[int(stat.parent.name)] = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError):
            continue
    found: set[int] = {pid}
    while new := {child for child, parent in parent_of.items() if parent in found} - found:
        found |= new
    return found - {pid}


def kill_machine(worker: subprocess.Popen) -> None:
    """SIGKILL the worker and every process under it (its flow run), as a lost machine would."""
    for pid in [worker.pid, *descendants(worker.pid)]:
        try:
            os.kill(pid, 9)
        except ProcessLookupError:
            pass
    worker.wait()


@pytest.mark.slow
def test_worker_killed_mid_training_and_a_fresh_worker_resumes_from_s3(s3_endpoint, tiny_config, tmp_path):
    import time

    from conftest import run_deployment

    from pipeline_config import load_config
    from tasks.lib.artifacts import ArtifactStore
    from tasks.lib.checkpoints import CHECKPOINT, read_checkpoint_file

    bucket, prefix = "qlora-artifacts", "e2e/artifacts"
    overrides = [f"artifacts.root=s3://{bucket}/{prefix}", "train.max_steps=60", "train.checkpoint_every=5",
                 "concurrency.lease_s=60"]
    for command in (("work-pool", "create", POOL, "--type", "process", "--overwrite"),
                    ("--no-prompt", "deploy", "--prefect-file", "deploy/prefect.yaml", "--all")):
        done = prefect_cli(*command)
        assert done.returncode == 0, done.stdout + done.stderr

    first_worker = start_worker(tmp_path / "worker-1.log", tmp_path / "machine-1")
    try:
        started = run_deployment(tiny_config, overrides, watch=False)
        assert started.returncode == 0, started.stdout + started.stderr

        def checkpoints() -> list[str]:
            listing = s3_endpoint.list_objects_v2(Bucket=bucket, Prefix=f"{prefix}/scratch/train/")
            return [o["Key"] for o in listing.get("Contents", []) if o["Key"].endswith(f"/{CHECKPOINT}")]

        deadline = time.monotonic() + 600
        while not checkpoints() and time.monotonic() < deadline:
            assert first_worker.poll() is None, (tmp_path / "worker-1.log").read_text()
            time.sleep(0.05)
        assert checkpoints(), "no training checkpoint reached object storage"
    finally:
        kill_machine(first_worker)

    body = s3_endpoint.get_object(Bucket=bucket, Key=checkpoints()[0])["Body"].read()
    (tmp_path / CHECKPOINT).write_bytes(body)
    killed_at = read_checkpoint_file(tmp_path / CHECKPOINT)["step"]
    assert 0 < killed_at < 60
    cfg = load_config(tiny_config, overrides)
    assert not (Path(cfg.publish.registry) / cfg.publish.repo).exists()  # nothing published by the dead run

    # The operator re-runs the deployment; a worker on another machine (empty disk cache) picks it up. It waits
    # for the dead run's concurrency lease to lapse, then finds the validate artifact and the checkpoint in S3.
    second_worker = start_worker(tmp_path / "worker-2.log", tmp_path / "machine-2")
    try:
        rerun = run_deployment(tiny_config, overrides, watch=True)
        assert rerun.returncode == 0, rerun.stdout + rerun.stderr + (tmp_path / "worker-2.log").read_text()
    finally:
        stop(second_worker)

    from tasks.lib.artifacts import ArtifactRef

    store = ArtifactStore(cfg.artifacts.root, local_cache=tmp_path / "reader")
    train_entries = s3_endpoint.list_objects_v2(Bucket=bucket, Prefix=f"{prefix}/index/train/")["Contents"]
    assert len(train_entries) == 1
    ref = ArtifactRef.model_validate_json(s3_endpoint.get_object(Bucket=bucket, Key=train_entries[0]["Key"])["Body"].read())
    metrics = json.loads((store.local_path(ref) / "train_metrics.json").read_text())
    assert metrics["resumed_from_step"] == killed_at and metrics["steps"] == 60  # resumed, not restarted
    assert not checkpoints()  # the finished adapter superseded the checkpoint
    # The second machine started empty and pulled what it needed (the validate artifact, ...) from S3.
    assert any((tmp_path / "machine-2" / "objects").iterdir())
    assert (Path(cfg.publish.registry) / cfg.publish.repo / "v1" / "release.json").is_file()
