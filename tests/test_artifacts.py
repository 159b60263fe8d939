"""The content-addressed store: immutable objects, atomic sealing, cache keys that see file content."""

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
