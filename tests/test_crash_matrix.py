"""A crash anywhere loses nothing: `qlora-pipeline run` on the tiny model, SIGKILLed in the middle of each stage's
critical write (tests/faults.py says where and how), then run again; and a disk that fills up during a seal.

One chain of runs on one store, each run killed later than the one before, so each run also shows what the
previous crash left: it passes the point where that one died, reusing every stage sealed before it.

    run  killed at                                   (training, tests/test_train_resume.py; the Hub commit,
    A    validate's seal (MANIFEST written, before     tests/test_hub_publish.py: covered there)
         the rename into objects/)
    B    merge's streamed model.safetensors, after its first tensor
    C    GPTQ's model.safetensors while gptqmodel writes it
    D    the registry copy into the hidden staging folder
    E    after the version's rename, before LATEST names it
    F    not killed: completes, publishes exactly one release

After every kill: each object in the store matches its manifest (hashed), every cache entry names one, and the
registry shows no version that is not complete. After F: one release, its files equal to the release bundle's
manifest, and `qlora-pipeline store verify` passes. A killed run holds its target's concurrency slot until its
lease lapses; the test frees it as an operator would for a run known dead (`prefect gcl delete`), rather than
wait `concurrency.lease_s`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, VENV_BIN, prefect_cli, write_tiny_config

from pipeline_config import load_config
from tasks.lib.artifacts import MANIFEST, ArtifactStore

pytestmark = pytest.mark.slow

CLI = str(VENV_BIN / "qlora-pipeline")
STAGE_LINE = re.compile(r" - ([\w-]+): (cache hit|built) ")
KILLED = -signal.SIGKILL


def run(config: Path, fault: str | None = None, *overrides: str) -> subprocess.CompletedProcess:
    """`qlora-pipeline run`, or the same command under tests/faults.py, killed at `fault`."""
    command = [sys.executable, "-m", "tests.faults", fault] if fault else [CLI]
    sets = [arg for kv in overrides for arg in ("--set", kv)]
    done = subprocess.run([*command, "run", "--config", str(config), *sets], cwd=REPO, capture_output=True,
                          text=True, timeout=900)
    done.output = done.stdout + done.stderr
    return done


def stages(output: str) -> dict[str, str]:
    """Stage -> "cache hit" | "built", from the stage log lines (a killed run prints no summary)."""
    return {m.group(1): m.group(2) for m in STAGE_LINE.finditer(output)}


def free_slot(cfg) -> None:
    from flows.locking import limit_name

    done = prefect_cli("--no-prompt", "gcl", "delete", limit_name(cfg))
    assert done.returncode == 0, done.stdout + done.stderr


def complete_safetensors(path: Path) -> bool:
    data = path.read_bytes()
    if len(data) < 8 or len(data) < 8 + (size := struct.unpack("<Q", data[:8])[0]):
        return False
    header = json.loads(data[8:8 + size])
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    return len(data) == 8 + size + end


def snapshot(cfg) -> dict:
    """What a reader of the store and the registry can see: sealed objects and their problems, cache entries,
    work folders in tmp/ (never read), and the registry's versions, LATEST and hidden staging folders."""
    store = ArtifactStore(cfg.artifacts.root)
    objects = {d: store.check(d) for d in store.objects()}
    kinds = {d: json.loads((Path(store.base) / "objects" / d / MANIFEST).read_text())["kind"] for d in objects}
    work = {}
    for folder in sorted((Path(store.base) / "tmp").glob("*")) if (Path(store.base) / "tmp").exists() else []:
        work[folder.name] = {p.relative_to(folder).as_posix(): p for p in folder.rglob("*") if p.is_file()}
    repo = Path(cfg.publish.registry) / cfg.publish.repo
    return {
        "objects": objects, "kinds": kinds,
        "index": {entry.split("/index/")[1].split("/")[0]: ref.sha256 if ref else None
                  for entry, ref in store.index_entries()},
        "work": work,
        "versions": sorted(p.name for p in repo.glob("v*")) if repo.exists() else [],
        "latest": (repo / "LATEST").read_text().strip() if (repo / "LATEST").exists() else None,
        "staging": sorted(p.name for p in repo.glob(".staging-*")) if repo.exists() else [],
    }


def assert_nothing_half_visible(seen: dict) -> None:
    assert all(problems == [] for problems in seen["objects"].values()), seen["objects"]
    assert set(seen["index"].values()) <= set(seen["objects"]), seen["index"]


def release_matches_bundle(cfg, version: str) -> None:
    """Every file of the published version is the release bundle's file, by the bundle's manifest."""
    from tasks.lib.artifacts import sha256_file

    folder = Path(cfg.publish.registry) / cfg.publish.repo / version
    record = json.loads((folder / "release.json").read_text())
    objects = Path(ArtifactStore(cfg.artifacts.root).base) / "objects"
    (bundle,) = [d for d in objects.iterdir() if json.loads((d / MANIFEST).read_text())["kind"] == "release"
                 and json.loads((d / "release.json").read_text())["release_hash"] == record["release_hash"]]
    manifest = json.loads((bundle / MANIFEST).read_text())["files"]
    published = {p.relative_to(folder).as_posix(): p for p in folder.rglob("*") if p.is_file()}
    assert published.keys() == manifest.keys()
    for rel, path in published.items():
        assert sha256_file(path) == manifest[rel]["sha256"], rel


@pytest.fixture(scope="module")
def crash_chain(tmp_path_factory, assets, tiny_model):
    """Runs A-F (see the module docstring): (config, {run: (process, stages, snapshot after it)})."""
    config = write_tiny_config(tmp_path_factory.mktemp("crash-chain"), assets, tiny_model)
    cfg = load_config(config)
    results = {}
    for name, fault in (("A", "validate-seal"), ("B", "merge-write"), ("C", "gptq-save"), ("D", "registry-copy"),
                        ("E", "registry-latest"), ("F", None)):
        done = run(config, fault)
        results[name] = (done, stages(done.output), snapshot(cfg))
        if done.returncode == KILLED:
            free_slot(cfg)
        else:
            break
    return config, results


def test_a_crash_at_any_stage_loses_nothing(crash_chain):
    config, results = crash_chain
    cfg = load_config(config)
    for name in "ABCDE":
        done, _, seen = results[name]
        assert done.returncode == KILLED, f"run {name} was not killed:\n{done.output[-3000:]}"
        assert_nothing_half_visible(seen)
    # The stages each run built (b) or found sealed (h); '-' never ran.
    expected_runs = {
        #      validate train evaluate gate-ft merge gate-merge quantize eval-q gate-q gate-serving release
        "B": "b b b b", "C": "h h h h b b", "D": "h h h h h h b b b b b", "E": "h h h h h h h h h h h",
        "F": "h h h h h h h h h h h",
    }
    order = ["validate", "train", "evaluate", "gate-finetune", "merge", "gate-merge", "quantize",
             "evaluate-quantized", "gate-quantized", "gate-serving", "release"]
    for name, expected in expected_runs.items():
        built = results[name][1]
        assert [{"cache hit": "h", "built": "b"}[built[s]] for s in order if s in built] == expected.split(), (
            name, built)

    a = results["A"][2]  # validate complete in tmp/, with its manifest, but not an object
    assert a["objects"] == {} and a["index"] == {} and a["versions"] == []
    assert [files.keys() >= {MANIFEST, "train_tokens.npz"} for files in a["work"].values()] == [True]

    b = results["B"][2]  # merge's model.safetensors cut short in its work folder; no merge object
    assert sorted(b["kinds"].values()) == ["evaluate", "gate-finetune", "train", "validate"]
    merge_work = [f for f in b["work"].values() if "model.safetensors" in f and "fidelity.json" not in f]
    assert len(merge_work) == 1 and not complete_safetensors(merge_work[0]["model.safetensors"])

    c = results["C"][2]  # GPTQ's weights cut short beside its quantize_config.json; no quantize object
    assert "merge" in c["kinds"].values() and "quantize" not in c["kinds"].values()
    gptq_work = [f for f in c["work"].values() if "quantize_config.json" in f]
    assert len(gptq_work) == 1 and not complete_safetensors(gptq_work[0]["model.safetensors"])

    d = results["D"][2]  # the release bundle is sealed; the registry shows no version, only a hidden staging copy
    assert "release" in d["kinds"].values()
    assert d["versions"] == [] and d["latest"] is None and len(d["staging"]) == 1

    e = results["E"][2]  # v1 renamed into place, whole; LATEST not written yet
    assert e["versions"] == ["v1"] and e["latest"] is None
    release_matches_bundle(cfg, "v1")

    done, _, f = results["F"]  # completes: finds v1 (no second release) and points LATEST at it
    assert done.returncode == 0, done.output[-3000:]
    assert "identical release already published" in done.output and "release: tiny-release/v1" in done.stdout
    assert f["versions"] == ["v1"] and f["latest"] == "v1"
    assert_nothing_half_visible(f)
    release_matches_bundle(cfg, "v1")
    verify = subprocess.run([CLI, "store", "verify", "--config", str(config)], capture_output=True, text=True,
                            timeout=300)
    assert verify.returncode == 0 and "0 damaged, 0 broken cache entries" in verify.stdout, verify.stdout


def test_a_tampered_adapter_never_reaches_a_release(crash_chain):
    """After the chain, the adapter's bytes change in the store (same size: bit rot, a hand edit). A run that
    must rebuild the release fails naming the object and the file, publishing nothing; the run after it
    retrains the adapter (the damaged object was set aside) and publishes the adapter its manifest names."""
    from flows.pipeline import qlora_pipeline
    from tasks.lib.artifacts import sha256_file

    config, _ = crash_chain
    cfg = load_config(config)
    store = ArtifactStore(cfg.artifacts.root)
    adapter = next(d for d in store.objects() if json.loads(
        (Path(store.base) / "objects" / d / MANIFEST).read_text())["kind"] == "train")
    weights = Path(store.base) / "objects" / adapter / "adapter_model.safetensors"
    original = sha256_file(weights)
    data = bytearray(weights.read_bytes())
    data[-100] ^= 0x01
    weights.write_bytes(bytes(data))

    tampered = qlora_pipeline(config=str(config), overrides=["gates.max_perplexity=1e8"], return_state=True)
    assert tampered.is_failed()
    assert f"artifact {adapter[:12]} (train)" in tampered.message
    assert "adapter_model.safetensors: sha256" in tampered.message
    assert snapshot(cfg)["versions"] == ["v1"]  # nothing published

    rebuilt = qlora_pipeline(config=str(config), overrides=["gates.max_perplexity=1e8"])
    hits = {s.stage: s.cache_hit for s in rebuilt.stages}
    assert hits["train"] is False and rebuilt.release.version == "v2"
    new_adapter = next(s.ref.sha256 for s in rebuilt.stages if s.stage == "train")
    manifest = json.loads((Path(store.base) / "objects" / new_adapter / MANIFEST).read_text())["files"]
    released = Path(rebuilt.release.path) / "adapter" / "adapter_model.safetensors"
    assert sha256_file(released) == manifest["adapter_model.safetensors"]["sha256"]
    if new_adapter == adapter:  # training is deterministic here: the very bytes the store first sealed
        assert sha256_file(released) == original
    release_matches_bundle(cfg, "v2")


def test_a_full_disk_during_a_seal_is_a_clear_error_and_the_next_run_with_space_succeeds(assets, tiny_model,
                                                                                         tmp_path):
    """The store on a 12 MiB tmpfs (a mount namespace of this user's, `unshare --user --mount`): validate and
    train fit, merge's 16 MB model does not. The kernel's ENOSPC, a clear error, no half object; then the same
    tmpfs grown to 200 MiB, and the next run reuses what was sealed and publishes."""
    unshare = shutil.which("unshare")
    probe = subprocess.run([unshare or "unshare", "--user", "--map-root-user", "--mount", "true"],
                           capture_output=True) if unshare else None
    if probe is None or probe.returncode != 0:
        pytest.skip("needs unprivileged user and mount namespaces (unshare) to mount a small tmpfs")
    config = write_tiny_config(tmp_path, assets, tiny_model)
    cfg = load_config(config)
    store = Path(cfg.artifacts.root)
    store.mkdir(parents=True)
    out = tmp_path / "out"
    out.mkdir()
    q = lambda p: f"'{p}'"  # noqa: E731
    run_line = f"{q(CLI)} run --config {q(config)}"
    script = "\n".join([
        "set -u",
        f"mount -t tmpfs -o size=12m tmpfs {q(store)}",
        f"{run_line} > {q(out / 'full.log')} 2>&1; echo $? > {q(out / 'full.rc')}",
        f"find {q(store)} -type f | sort > {q(out / 'after-full.txt')}",
        f"{q(CLI)} store verify --config {q(config)} > {q(out / 'verify.txt')} 2>&1",
        f"mount -o remount,size=200m {q(store)}",
        f"{run_line} > {q(out / 'space.log')} 2>&1; echo $? > {q(out / 'space.rc')}",
    ])
    done = subprocess.run([unshare, "--user", "--map-root-user", "--mount", "sh", "-c", script], cwd=REPO,
                          capture_output=True, text=True, timeout=1800, env=os.environ)
    assert done.returncode == 0, done.stdout + done.stderr

    full = (out / "full.log").read_text()
    assert (out / "full.rc").read_text().strip() == "1", full[-3000:]
    assert "merge: no space left for its artifact in the store at" in full and "nothing was sealed" in full
    assert "No space left on device" in full
    left = (out / "after-full.txt").read_text().split()
    assert not [f for f in left if f.startswith(f"{store}/tmp/")]  # the merge's work folder is gone
    assert {Path(f).parts[len(store.parts) + 1] for f in left if "/index/" in f} == {
        "validate", "train", "evaluate", "gate-finetune"}
    verify = (out / "verify.txt").read_text()
    assert "checked 4 objects" in verify and "0 damaged, 0 broken cache entries, 0 unfinished" in verify, verify

    space = (out / "space.log").read_text()
    assert (out / "space.rc").read_text().strip() == "0", space[-3000:]
    built = stages(space)
    assert [built[s] for s in ("validate", "train", "evaluate", "gate-finetune")] == ["cache hit"] * 4
    assert built["merge"] == "built" and "release: tiny-release/v1" in space
