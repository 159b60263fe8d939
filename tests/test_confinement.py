"""Nothing a caller passes escapes its folder: every name that becomes a path is checked when the config is
loaded (the error names the key), and where a folder on disk could hold a symlink, the resolved path is checked
before anything is written. Also: settings that decide which code runs cannot come from an override."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import write_release_record

from pipeline_config import ConfigError, load_config
from pipeline_config.confine import PathEscape, inside
from tasks.lib.artifacts import ArtifactRef, ArtifactStore, CorruptArtifact, sha256_json

pytestmark = pytest.mark.no_prefect  # no flow or task runs: no Prefect server


@pytest.mark.parametrize(("override", "named"), [
    ("publish.repo=../../../../elsewhere", "publish.repo: '../../../../elsewhere' is not a plain name"),
    ("publish.repo=/etc", "publish.repo: '/etc' is not a plain name"),
    ("publish.repo=..", "publish.repo: '..' is not a plain name"),
    ("publish.repo=a/../../b", "publish.repo"),
    ("publish.repo=ok\x00/../x", "publish.repo: contains a NUL byte"),
    ("publish.target=hf://acme/a..b", "publish.target NAME: 'a..b' is not a plain name"),
    ("data.train_path=acme/chats@main:../../../etc/passwd", "data.train_path: FILE of ORG/NAME@REVISION:FILE: "
                                                             "'../../../etc/passwd' must be a relative path"),
    ("data.eval_path=acme/chats:/etc/passwd", "data.eval_path: FILE of ORG/NAME@REVISION:FILE: '/etc/passwd'"),
    ("data.train_path=acme/chats@../../x:train.jsonl", "data.train_path: revision '../../x'"),
    ("data.train_path=train\x00.jsonl", "data.train_path: contains a NUL byte"),
    ("model.base=acme/llama@../../../tmp", "model.base: revision '../../../tmp'"),
    ("model.base=/models/llama\x00", "model.base: contains a NUL byte"),
    ("data.chat_template=..", "data.chat_template (a shipped template's name): '..' is not a plain name"),
    ("data.chat_template=/etc/passwd", "data.chat_template: '/etc/passwd': a chat template file ends in .jinja"),
    ("data.contract=/etc/shadow", "data.contract: '/etc/shadow': a data contract is a Great Expectations suite"),
    ("eval.lm_eval={tasks: [t], include_path: /tmp/anything}", "eval.lm_eval: set it in the config file, not as "
                                                              "an override"),
    ("model.trust_remote_code=true", "model.trust_remote_code: set it in the config file"),
    ("model={base: acme/custom, trust_remote_code: true}", "model.trust_remote_code: set it in the config file"),
])
def test_a_name_that_would_escape_fails_at_config_load_naming_the_key(override, named):
    with pytest.raises(ConfigError) as failure:
        load_config(None, [override])
    assert named in str(failure.value)


def test_plain_names_and_paths_still_load(tmp_path):
    cfg = load_config(None, ["publish.repo=llama-3.1-8b_support.v2", "publish.target=hf://acme/llama-3.1-8b",
                             "data.train_path=acme/chats@refs/pr/1:data/*.jsonl", "model.base=acme/llama@v2.1",
                             "data.chat_template=chatml", f"data.contract={tmp_path}/suite.json",
                             "model.base=../models/llama"])  # the config's own paths may go anywhere
    assert cfg.publish.repo == "llama-3.1-8b_support.v2" and cfg.model.base == "../models/llama"
    code_keys = tmp_path / "c.yaml"  # the config file (its author is trusted) may set what overrides may not
    code_keys.write_text(yaml.safe_dump({"data": {"train_path": "t.jsonl"}, "publish": {"repo": "r"},
                                         "model": {"base": "acme/custom", "trust_remote_code": True}}))
    assert load_config(code_keys, ["train.max_steps=3"]).model.trust_remote_code


def test_inside_refuses_dot_dot_absolute_and_symlinks_pointing_out(tmp_path):
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    (tmp_path / "outside").mkdir()
    (root / "out").symlink_to(tmp_path / "outside")
    (root / "in").symlink_to(root / "sub")
    assert inside(root, "sub/file", "k") == root.resolve() / "sub" / "file"
    assert inside(root, "in/file", "k") == root.resolve() / "in" / "file"  # a symlink that stays inside
    for bad in ("../outside", "/etc/passwd", "sub/../../outside", "out", "out/file", "a\\..\\b", ""):
        with pytest.raises(PathEscape, match="^k: "):
            inside(root, bad, "k")


def release_bundle(tmp_path) -> str:
    store = ArtifactStore(str(tmp_path / "store"))
    work = store.new_workdir()
    write_release_record(work, "f" * 64)
    (work / "model.safetensors").write_bytes(b"weights")
    return store.put(work, kind="release").uri


def test_publish_repo_cannot_climb_out_of_the_registry(tmp_path):
    """The report's reproduction: `qlora-pipeline publish --release ... --set publish.repo=../../../../elsewhere`."""
    bundle = release_bundle(tmp_path)
    registry = tmp_path / "a" / "b" / "c" / "d" / "registry"
    done = subprocess.run(
        [str(Path(sys.executable).parent / "qlora-pipeline"), "publish", "--release", bundle,
         "--set", f"publish.registry={registry}", "--set", "publish.repo=../../../../elsewhere"],
        capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "publish.repo: '../../../../elsewhere' is not a plain name" in done.stderr
    assert not (tmp_path / "a" / "elsewhere").exists() and not registry.exists()


def test_a_repo_folder_symlinked_out_of_the_registry_is_refused(tmp_path):
    from tasks.lib import registry

    bundle = release_bundle(tmp_path)
    outside = tmp_path / "outside"
    outside.mkdir()
    (tmp_path / "registry").mkdir()
    (tmp_path / "registry" / "tiny").symlink_to(outside)
    cfg = load_config(None, [f"publish.registry={tmp_path / 'registry'}", "publish.repo=tiny"])
    store = ArtifactStore(str(tmp_path / "store"))
    digest = bundle.rsplit("/", 1)[1]
    with pytest.raises(PathEscape, match=r"publish.repo: 'tiny' resolves to .*/outside, outside .*/registry"):
        registry.publish_local(cfg, store.local_path(ArtifactRef(uri=bundle, sha256=digest, kind="release")))
    with pytest.raises(PathEscape):
        registry.current_release(cfg)
    assert list(outside.iterdir()) == []


def test_an_object_whose_manifest_names_a_file_outside_it_is_never_read(tmp_path):
    """A planted object consistent with its own address (whoever can write the store can compute one), whose
    manifest lists a path outside the object: the store refuses it rather than read (or hash) that file."""
    secret = tmp_path / "secret.txt"
    secret.write_text("not for the release")
    files = {"../../../secret.txt": {"sha256": "0" * 64, "size": 19}}
    digest = sha256_json(files)
    folder = tmp_path / "store" / "objects" / digest
    folder.mkdir(parents=True)
    (folder / "MANIFEST.json").write_text(json.dumps({"files": files}))
    store = ArtifactStore(str(tmp_path / "store"))
    ref = ArtifactRef(uri=f"{store.root}/objects/{digest}", sha256=digest, kind="adapter")
    assert store.check(digest) == [
        "MANIFEST.json names a file outside the object (file name: '../../../secret.txt' must be a relative path "
        "inside its folder (not absolute, no '..' segment, no backslash))"]
    with pytest.raises(CorruptArtifact, match="names a file outside the object"):
        store.local_path(ref)
