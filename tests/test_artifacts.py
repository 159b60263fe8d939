"""The content-addressed store: immutable objects, atomic sealing, cache keys that see file content."""

import json
from pathlib import Path

import pytest

from tasks.lib.artifacts import ArtifactStore, cache_key, sha256_path

pytestmark = pytest.mark.no_prefect  # no flow or task runs: no Prefect server


def build(store: ArtifactStore, text: str) -> Path:
    workdir = store.new_workdir()
    (workdir / "sub").mkdir()
    (workdir / "sub" / "a.txt").write_text(text)
    return workdir


def test_same_content_same_address_and_immutable(tmp_path):
    store = ArtifactStore(str(tmp_path / "store"))
    first = store.put(build(store, "hello"), kind="x")
    second = store.put(build(store, "hello"), kind="x")
    other = store.put(build(store, "world"), kind="x")
    assert first.sha256 == second.sha256 != other.sha256
    assert (store.local_path(first) / "sub" / "a.txt").read_text() == "hello"
    assert list((tmp_path / "store" / "tmp").iterdir()) == []  # nothing left in progress


def test_cache_index_ignores_objects_without_manifest(tmp_path):
    store = ArtifactStore(str(tmp_path / "store"))
    ref = store.put(build(store, "hello"), kind="x")
    store.record("stage", "key", ref)
    assert store.lookup("stage", "key") == ref
    (store.local_path(ref) / "MANIFEST.json").unlink()  # as if a crash interrupted an upload
    assert store.lookup("stage", "key") is None


def test_cache_key_changes_with_file_content_not_path_name(tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_text('{"a": 1}\n')
    key1 = cache_key("s", "code", {"x": 1}, {"data": sha256_path(data)})
    data.write_text('{"a": 2}\n')  # same path, new content
    key2 = cache_key("s", "code", {"x": 1}, {"data": sha256_path(data)})
    assert key1 != key2
    assert key1 != cache_key("s", "code", {"x": 2}, {"data": "whatever"})


def test_missing_input_file_raises(tmp_path):
    with pytest.raises(FileNotFoundError):
        sha256_path(tmp_path / "nope.jsonl")


# -- what the store reads back is checked --------------------------------------------------------------------
def sealed(store: ArtifactStore, files: dict[str, bytes]):
    workdir = store.new_workdir()
    for rel, data in files.items():
        (workdir / rel).parent.mkdir(parents=True, exist_ok=True)
        (workdir / rel).write_bytes(data)
    return store.put(workdir, kind="adapter")


def flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_a_changed_file_fails_its_reader_naming_object_and_file_and_the_next_lookup_rebuilds(tmp_path, caplog):
    from tasks.lib import artifacts

    store = ArtifactStore(str(tmp_path / "store"))
    files = {"adapter_model.safetensors": b"w" * 4096, "adapter_config.json": b"{}"}
    ref = sealed(store, files)
    store.record("train", "key", ref)
    flip_a_byte(tmp_path / "store" / "objects" / ref.sha256 / "adapter_model.safetensors")  # same size: bit rot
    artifacts._verified.clear()  # another process: nothing verified yet

    with pytest.raises(artifacts.CorruptArtifact, match=rf"artifact {ref.sha256[:12]} \(adapter\) at .*: "
                                                        r"adapter_model.safetensors: sha256 .* the manifest says"):
        store.local_path(ref)
    assert not (tmp_path / "store" / "objects" / ref.sha256).exists()  # set aside, into tmp/
    assert [p.name[:11] for p in (tmp_path / "store" / "tmp").iterdir()] == ["quarantine-"]
    with pytest.raises(artifacts.CorruptArtifact, match="set aside as damaged"):  # a retry says why, too
        store.local_path(ref)
    assert store.lookup("train", "key") is None  # so the stage builds it again ...
    assert sealed(store, files) == ref and store.lookup("train", "key") == ref  # ... to the same address
    assert store.local_path(ref).joinpath("adapter_model.safetensors").read_bytes() == files["adapter_model.safetensors"]


@pytest.mark.parametrize("damage", ["truncated", "extra file", "missing file", "symlink", "manifest edited",
                                    "bad index entry"])
def test_a_damaged_cache_hit_is_a_miss(tmp_path, damage):
    store = ArtifactStore(str(tmp_path / "store"))
    ref = sealed(store, {"model.safetensors": b"m" * 1000, "sub/config.json": b"{}"})
    store.record("merge", "key", ref)
    folder = tmp_path / "store" / "objects" / ref.sha256
    outside = tmp_path / "outside.json"
    outside.write_text("{}")
    if damage == "truncated":
        (folder / "model.safetensors").write_bytes(b"m" * 10)
    elif damage == "extra file":
        (folder / "custom_code.py").write_text("import os")
    elif damage == "missing file":
        (folder / "sub" / "config.json").unlink()
    elif damage == "symlink":
        (folder / "sub" / "config.json").unlink()
        (folder / "sub" / "config.json").symlink_to(outside)
    elif damage == "manifest edited":
        manifest = json.loads((folder / "MANIFEST.json").read_text())
        manifest["files"]["model.safetensors"]["size"] = 10
        (folder / "MANIFEST.json").write_text(json.dumps(manifest))
    else:  # an index entry naming a path instead of a digest
        (tmp_path / "store" / "index" / "merge" / "key.json").write_text(json.dumps(
            {"uri": "x", "sha256": "../../../outside", "kind": "merge"}))
    assert store.lookup("merge", "key") is None
    assert outside.read_text() == "{}"


def test_each_object_is_hashed_once_per_process(tmp_path):
    from tasks.lib import artifacts

    store = ArtifactStore(str(tmp_path / "store"))
    ref = sealed(store, {"a.bin": b"a" * 100_000})
    before = artifacts.verification_stats()["bytes"]
    store.local_path(ref)
    assert artifacts.verification_stats()["bytes"] == before  # sealed by this process: not hashed again
    artifacts._verified.clear()
    store.local_path(ref)
    store.local_path(ref)
    assert artifacts.verification_stats()["bytes"] == before + 100_000


def test_a_remote_download_is_checked_before_it_enters_the_cache(tmp_path):
    import fsspec

    from tasks.lib import artifacts

    root = f"memory://qlora-{tmp_path.name}"  # fsspec's in-memory file system: a real remote code path
    store = ArtifactStore(root, local_cache=tmp_path / "cache")
    ref = sealed(store, {"model.safetensors": b"m" * 1000})
    fs = fsspec.filesystem("memory")
    remote_file = f"{store.base}/objects/{ref.sha256}/model.safetensors"
    other = ArtifactStore(root, local_cache=tmp_path / "other-machine")
    assert (other.local_path(ref) / "model.safetensors").read_bytes() == b"m" * 1000

    fs.pipe_file(remote_file, b"M" * 1000)  # someone with write access to the bucket
    third = ArtifactStore(root, local_cache=tmp_path / "third-machine")
    with pytest.raises(artifacts.CorruptArtifact, match=rf"{ref.sha256[:12]} .* downloaded from {root}: "
                                                        r"model.safetensors: sha256"):
        third.local_path(ref)
    assert not (tmp_path / "third-machine" / "objects" / ref.sha256).exists()
    assert list((tmp_path / "third-machine" / "tmp").iterdir()) == []
    assert store.check(ref.sha256) and store.check(ref.sha256)[0].startswith("model.safetensors: sha256")

    # A cached copy damaged on the local disk is downloaded again (here: the bucket was mended meanwhile).
    fs.pipe_file(remote_file, b"m" * 1000)
    flip_a_byte(tmp_path / "other-machine" / "objects" / ref.sha256 / "model.safetensors")
    artifacts._verified.clear()
    assert (other.local_path(ref) / "model.safetensors").read_bytes() == b"m" * 1000


def test_the_local_cache_is_this_users_folder(tmp_path, monkeypatch):
    import os
    import stat

    monkeypatch.setenv("QLORA_PIPELINE_CACHE", str(tmp_path / "cache"))
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache").chmod(0o777)  # as a shared temp folder would be
    cache = ArtifactStore("memory://somewhere").local_cache
    assert cache == tmp_path / "cache"
    assert stat.S_IMODE(cache.stat().st_mode) == 0o700 and cache.stat().st_uid == os.getuid()
    monkeypatch.setenv("QLORA_PIPELINE_CACHE", str(tmp_path / "planted"))
    (tmp_path / "planted").symlink_to(tmp_path / "cache")
    with pytest.raises(PermissionError, match="must be a folder this user"):
        _ = ArtifactStore("memory://somewhere").local_cache
    monkeypatch.delenv("QLORA_PIPELINE_CACHE")
    assert ArtifactStore("memory://x")._local_cache is None  # not created until a remote object is needed


def test_a_full_disk_while_building_is_a_clear_error_and_leaves_nothing(tmp_path):
    import errno

    from pydantic import BaseModel

    from tasks.lib.artifacts import StoreFull
    from tasks.lib.stage import StageSpec, run_stage

    class Empty(BaseModel):
        pass

    def build(view, workdir, key):
        (workdir / "part").write_bytes(b"x" * 10)
        raise OSError(errno.ENOSPC, "No space left on device", str(workdir / "model.safetensors"))

    store = ArtifactStore(str(tmp_path / "store"))
    with pytest.raises(StoreFull, match=r"merge: no space left for its artifact in the store at .*nothing was sealed"):
        run_stage(StageSpec("merge", "tasks.merge", reads=()), store, Empty(), inputs={}, build=build)
    assert list((tmp_path / "store" / "tmp").iterdir()) == [] and not (tmp_path / "store" / "objects").exists()


def test_store_verify_and_gc_as_the_readme_shows(tmp_path):
    import os
    import subprocess
    import sys
    import time

    import yaml

    store = ArtifactStore(str(tmp_path / "store"))
    kept = sealed(store, {"a.bin": b"a" * 100})
    store.record("train", "k1", kept)
    damaged = sealed(store, {"b.bin": b"b" * 100})
    store.record("merge", "k2", damaged)
    orphan = sealed(store, {"c.bin": b"c" * 100})  # named by no cache entry
    flip_a_byte(tmp_path / "store" / "objects" / damaged.sha256 / "b.bin")
    leftover = store.new_workdir()  # a killed stage's work folder
    (leftover / "partial.safetensors").write_bytes(b"p" * 100)
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"data": {"train_path": "t.jsonl"}, "model": {"base": "m"},
                                      "publish": {"repo": "r"}, "artifacts": {"root": str(tmp_path / "store")}}))
    cli = [str(Path(sys.executable).parent / "qlora-pipeline"), "store"]
    home = tmp_path / "home"  # the README sets nothing for these: only PATH, and a fresh HOME
    home.mkdir()

    def run(*args):
        return subprocess.run([*cli, *args, "--config", str(config)], capture_output=True, text=True, timeout=120,
                              cwd=Path(__file__).parent.parent, env={"PATH": os.environ["PATH"], "HOME": str(home)})

    found = run("verify")
    assert found.returncode == 1 and f"damaged  {damaged.sha256}: b.bin: sha256" in found.stdout
    assert "index/merge/k2.json: names a damaged object" in found.stdout
    assert "checked 3 objects" in found.stdout and "1 damaged, 1 broken cache entries" in found.stdout
    repaired = run("verify", "--repair")
    assert repaired.returncode == 0 and "repaired: 1 objects set aside in tmp/, 1 cache entries dropped" in repaired.stdout
    assert run("verify").returncode == 0 and store.lookup("merge", "k2") is None

    assert "would free 0.00 GB" in run("gc", "--dry-run", "--older-than", "1h").stdout  # all of it is new
    old = time.time() - 3 * 86400
    for path in [*(tmp_path / "store" / "tmp").rglob("*"), *(tmp_path / "store" / "objects").rglob("*")]:
        os.utime(path, (old, old), follow_symlinks=False)
    swept = run("gc", "--older-than", "2d")
    assert swept.returncode == 0, swept.stderr
    assert list((tmp_path / "store" / "tmp").iterdir()) == []  # the leftover and the set-aside object
    assert sorted(p.name for p in (tmp_path / "store" / "objects").iterdir()) == [kept.sha256]
    assert f"objects/{orphan.sha256}" in swept.stdout and "no cache entry or release names it" in swept.stdout
    assert run("verify").returncode == 0
