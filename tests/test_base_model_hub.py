"""`model.base` as a Hub id (`ORG/NAME[@REVISION]`): a private tiny model repo on tests/hub_server.py, downloaded
by the real huggingface_hub client through the whole flow."""

from __future__ import annotations

import json
import secrets
from pathlib import Path

import pytest
import torch

from flows.pipeline import qlora_pipeline
from tasks.lib import hub
from tasks.lib.artifacts import ArtifactStore
from tests.hub_server import HubServer

TOKEN = "hf_" + secrets.token_hex(16)
REPO_ID = "acme/tiny-base"


def lfs_settings(server):
    """The loopback server has no Xet storage: upload large files through LFS, as publish.transfer=lfs does."""
    from pipeline_config import validate_config

    return hub.client_settings(validate_config({
        "data": {"train_path": "t.jsonl"}, "model": {"base": "m"},
        "publish": {"repo": "r", "endpoint": server.url, "transfer": "lfs"}}))


@pytest.fixture
def hub_base(tmp_path, tiny_model):
    """The tiny model as a private repo acme/tiny-base; yields (server, api)."""
    from huggingface_hub import HfApi

    server = HubServer({TOKEN: {"user": "alice", "orgs": ["acme"], "role": "write"}}, tmp_path / "hub").start()
    api = HfApi(endpoint=server.url, token=TOKEN)
    api.create_repo(REPO_ID, private=True)
    with lfs_settings(server):
        api.upload_folder(folder_path=str(tiny_model), repo_id=REPO_ID, commit_message="tiny base")
    yield server, api
    server.stop()


def stage(result, name):
    return next(s for s in result.stages if s.stage == name)


@pytest.mark.slow
def test_base_model_by_hub_id_is_fetched_once_per_commit_and_named_in_the_card(hub_base, tiny_config, tmp_path,
                                                                                 monkeypatch, tiny_model):
    from huggingface_hub import ModelCard

    server, api = hub_base
    monkeypatch.setenv("HF_TOKEN", TOKEN)  # the README's `export HF_TOKEN=...`
    hub_set = [f"model.base={REPO_ID}@main", "model.name=null", f"publish.endpoint={server.url}"]
    first_commit = api.model_info(REPO_ID).sha

    first = qlora_pipeline(config=str(tiny_config), overrides=hub_set)
    fetched = stage(first, "fetch-base-model")
    assert not fetched.cache_hit and first.release.created and first.release.version == "v1"
    folder = ArtifactStore(str(tmp_path / "artifacts")).local_path(fetched.ref)
    assert json.loads((folder / "hub_source.json").read_text()) == {"id": REPO_ID, "revision": "main",
                                                                    "commit": first_commit}
    assert (folder / "model.safetensors").is_file() and not (folder / ".cache").exists()
    card = ModelCard.load(Path(first.release.path) / "README.md")
    assert card.data.base_model == REPO_ID and first_commit in card.text

    # The same revision again, and the commit itself: cache hits everywhere, no download, no new release.
    for base in (f"{REPO_ID}@main", f"{REPO_ID}@{first_commit}"):
        before = len(server.state.requests)
        again = qlora_pipeline(config=str(tiny_config), overrides=[*hub_set, f"model.base={base}"])
        assert all(s.cache_hit for s in again.stages) and not again.release.created
        downloads = [r for r in server.state.requests[before:] if "/resolve/" in r[1] and "config.json" not in r[1]]
        assert downloads == [], downloads

    # main moves (new weights): a new commit, so the base model and every stage after it are new.
    from transformers import AutoModelForCausalLM

    moved = tmp_path / "moved"
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight.mul_(0.5)
    model.save_pretrained(moved)
    with lfs_settings(server):
        api.upload_folder(folder_path=str(moved), repo_id=REPO_ID, commit_message="new weights")
    second_commit = api.model_info(REPO_ID).sha
    assert second_commit != first_commit
    third = qlora_pipeline(config=str(tiny_config), overrides=hub_set)
    assert not stage(third, "fetch-base-model").cache_hit and not stage(third, "train").cache_hit
    assert third.release.created and third.release.version == "v2"
    assert second_commit in (Path(third.release.path) / "README.md").read_text()


def test_a_wrong_or_missing_token_fails_at_preflight_naming_the_repo(hub_base, tiny_config, tmp_path, monkeypatch):
    server, _ = hub_base
    hub_set = [f"model.base={REPO_ID}@main", f"publish.endpoint={server.url}"]
    bad = "hf_" + secrets.token_hex(16)
    monkeypatch.setenv("HF_TOKEN", bad)
    state = qlora_pipeline(config=str(tiny_config), overrides=hub_set, return_state=True)
    assert state.is_failed() and f"model.base {REPO_ID}@main at {server.url}: token rejected" in state.message
    assert bad not in state.message

    monkeypatch.delenv("HF_TOKEN")
    state = qlora_pipeline(config=str(tiny_config), overrides=hub_set, return_state=True)
    assert state.is_failed() and "not found, or not readable with no token" in state.message

    monkeypatch.setenv("HF_TOKEN", TOKEN)
    state = qlora_pipeline(config=str(tiny_config), overrides=[*hub_set, f"model.base={REPO_ID}@no-such-branch"],
                           return_state=True)
    assert state.is_failed() and "has no revision 'no-such-branch'" in state.message
    assert not (tmp_path / "artifacts" / "index").exists()  # nothing ran after preflight


@pytest.mark.slow
def test_train_and_eval_data_from_a_private_hub_dataset(hub_base, tiny_config, tmp_path, monkeypatch, assets):
    """data.train_path / data.eval_path as ORG/NAME@REVISION:FILE: fetched at the resolved commit, cached by it,
    named in the card (datasets: the repo id) and its lineage (the commit); a file that is not there fails at
    preflight."""
    from huggingface_hub import ModelCard

    server, api = hub_base
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    api.create_repo("acme/chats", repo_type="dataset", private=True)
    api.upload_folder(folder_path=str(assets["data"]), repo_id="acme/chats", repo_type="dataset",
                      allow_patterns=["*.jsonl"], commit_message="chatterbot rows")
    commit = api.dataset_info("acme/chats").sha
    hub_set = ["data.train_path=acme/chats@main:train.jsonl", "data.eval_path=acme/chats@main:eval*.jsonl",
               f"publish.endpoint={server.url}"]

    first = qlora_pipeline(config=str(tiny_config), overrides=hub_set)
    fetched = [s for s in first.stages if s.stage == "fetch-dataset"]
    assert len(fetched) == 2 and not any(s.cache_hit for s in fetched) and first.release.created
    card = ModelCard.load(Path(first.release.path) / "README.md")
    assert card.data.datasets == ["acme/chats"] and commit in card.text and "eval.jsonl" in card.text

    again = qlora_pipeline(config=str(tiny_config), overrides=hub_set)
    assert all(s.cache_hit for s in again.stages) and not again.release.created

    state = qlora_pipeline(config=str(tiny_config), overrides=[*hub_set, "data.eval_path=acme/chats:test.jsonl"],
                           return_state=True)
    assert state.is_failed() and "data.eval_path acme/chats@main" in state.message
    assert "'test.jsonl' matches 0 files" in state.message


def test_custom_code_is_refused_unless_the_config_allows_it(tmp_path, tiny_model):
    from pipeline_config import validate_config
    from tasks.lib import hub_sources

    folder = tmp_path / "custom"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "auto_map": {
        "AutoModelForCausalLM": "modeling_custom.CustomForCausalLM"}}))
    raw = {"data": {"train_path": "t.jsonl"}, "model": {"base": "acme/custom"}, "publish": {"repo": "r"}}
    with pytest.raises(hub.HubError, match=r"asks for custom code .*model.trust_remote_code: true"):
        hub_sources.refuse_remote_code(validate_config(raw), folder)
    raw["model"]["trust_remote_code"] = True
    hub_sources.refuse_remote_code(validate_config(raw), folder)  # allowed: no error
    assert hub_sources.hub_model_id("acme/custom@v2") == ("acme/custom", "v2")
    assert hub_sources.hub_model_id(str(tiny_model)) is None  # a folder is a folder
