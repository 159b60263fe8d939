"""The stage contract: a build sees only the config its StageSpec declares, the key holds exactly that,
the code hash follows the project modules a stage imports and ignores docstrings, and a hit shows in
Prefect as `Cached`."""

import importlib
import sys
import textwrap

import pytest

from pipeline_config import load_config
from tasks import (
    evaluate,
    evaluate_published,
    fetch_base_model,
    fetch_dataset,
    gate,
    merge,
    publish,
    quantize,
    train,
    validate,
)
from tasks.lib import stage
from tasks.lib.artifacts import ArtifactStore
from tasks.lib.stage import (
    StageConfig,
    StageSpec,
    UndeclaredConfigRead,
    code_hash,
    modules_reached,
    run_stage,
    stage_key,
)

pytestmark = pytest.mark.no_prefect  # no flow or task runs: no Prefect server

SPECS = [validate.VALIDATE, train.TRAIN, evaluate.EVALUATE, evaluate.EVALUATE_QUANTIZED,
         evaluate_published.EVALUATE_PUBLISHED, gate.GATE, merge.MERGE, quantize.QUANTIZE, publish.RELEASE,
         fetch_base_model.FETCH_BASE_MODEL, fetch_dataset.FETCH_DATASET]


def test_a_build_that_reads_an_undeclared_section_fails_naming_it(tmp_path):
    cfg = load_config(None, [f"artifacts.root={tmp_path / 'store'}"])
    store = ArtifactStore(cfg.artifacts.root)
    spec = StageSpec("toy", "tasks.gate", reads=("gates", "train.max_steps"))

    def reads_lora(view, workdir, key):
        (workdir / "out.txt").write_text(str(view.lora.r))

    with pytest.raises(UndeclaredConfigRead, match=r"stage 'toy' read config `lora`.*reads: gates, train.max_steps"):
        run_stage(spec, store, cfg, inputs={}, build=reads_lora)
    with pytest.raises(UndeclaredConfigRead, match="`train.learning_rate`"):
        run_stage(spec, store, cfg, inputs={}, build=lambda view, workdir, key: view.train.learning_rate)
    assert not list((tmp_path / "store" / "tmp").iterdir())  # the failed builds left nothing behind

    def declared(view, workdir, key):
        (workdir / "out.txt").write_text(f"{view.gates.max_perplexity} {view.train.max_steps}")

    assert not run_stage(spec, store, cfg, inputs={}, build=declared).cache_hit
    assert run_stage(spec, store, cfg, inputs={}, build=declared).cache_hit


def test_the_key_holds_the_declared_config_and_nothing_else(tmp_path):
    cfg = load_config(None, [f"artifacts.root={tmp_path / 'store'}"])
    store = ArtifactStore(cfg.artifacts.root)
    spec = StageSpec("toy", "tasks.gate", reads=("gates", "train.max_steps"))

    def build(view, workdir, key):
        (workdir / "key").write_text(key)

    first = run_stage(spec, store, cfg, inputs={}, build=build)
    undeclared = load_config(None, [f"artifacts.root={tmp_path / 'store'}", "train.learning_rate=0.1", "lora.r=4"])
    assert run_stage(spec, store, undeclared, inputs={}, build=build).cache_hit
    declared = load_config(None, [f"artifacts.root={tmp_path / 'store'}", "train.max_steps=7"])
    assert run_stage(spec, store, declared, inputs={}, build=build).ref != first.ref


def test_timings_and_declared_reports_are_out_of_the_payload(tmp_path):
    """Two builds that differ only in their wall seconds (timing.json, for every stage) or in a declared report
    have different addresses and the same payload, which is what later stages key on."""
    import json
    import time

    cfg = load_config(None, [f"artifacts.root={tmp_path / 'store'}"])
    store = ArtifactStore(cfg.artifacts.root)
    spec = StageSpec("toy", "tasks.gate", reads=("gates",), reports=("report.md",))

    def build(view, workdir, key):
        (workdir / "result.json").write_text(json.dumps(view.gates.max_perplexity))
        (workdir / "timing.json").write_text(json.dumps({"seconds": time.perf_counter()}))
        (workdir / "report.md").write_text(f"built at {time.time()}")

    first = run_stage(spec, store, cfg, inputs={"n": "1"}, build=build)
    second = run_stage(spec, store, cfg, inputs={"n": "2"}, build=build)
    assert first.ref.sha256 != second.ref.sha256 and first.ref.payload == second.ref.payload
    other = load_config(None, [f"artifacts.root={tmp_path / 'store'}", "gates.max_perplexity=7"])
    assert run_stage(spec, store, other, inputs={"n": "3"}, build=build).ref.payload != first.ref.payload


def stage_keys(*overrides: str) -> dict[str, str]:
    """Every stage's key under the embedded default with these overrides, for the same inputs."""
    cfg = load_config(None, list(overrides))
    return {spec.name: stage_key(spec, StageConfig(cfg, spec.reads, spec.name, unkeyed=spec.uses), {})
            for spec in SPECS}


def changed_keys(*overrides: str) -> set[str]:
    before, after = stage_keys(), stage_keys(*overrides)
    return {name for name in before if before[name] != after[name]}


def test_card_text_paths_and_logging_are_not_in_any_build_key(tmp_path):
    # The card's names and the base's folder (keyed by content in `inputs`) reach the release bundle only.
    assert changed_keys("model.name=renamed-base", "data.name=renamed-data") == {"release"}
    assert changed_keys(f"model.base={tmp_path / 'moved'}") == {"release"}
    assert changed_keys("train.log_every=1") == {"release"}  # logging: the bundle records the config
    assert "train" in changed_keys("train.learning_rate=0.001")


def test_device_enters_keys_resolved(monkeypatch):
    """`device: auto` is `cpu` here and `cuda:sm_90` on an H100/H200: a GPU worker sharing the store does not
    reuse what the CPU built, and two GPU generations do not share kernels' results."""
    import torch

    on_cpu = stage_keys()
    assert stage_keys("device=cpu") == on_cpu  # auto resolves to what is here
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    on_gpu = stage_keys()
    assert on_gpu == stage_keys("device=cuda")
    assert {n for n in on_cpu if on_cpu[n] != on_gpu[n]} == {
        "train", "evaluate", "evaluate-quantized", "evaluate-published", "merge", "quantize", "release"}
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (8, 0))
    assert stage_keys()["quantize"] != on_gpu["quantize"]


def test_a_build_may_not_capture_the_whole_config(tmp_path):
    cfg = load_config(None, [f"artifacts.root={tmp_path / 'store'}"])
    with pytest.raises(TypeError, match="captures the whole config"):
        run_stage(gate.GATE, ArtifactStore(cfg.artifacts.root), cfg, inputs={},
                  build=lambda view, workdir, key: cfg.lora.r)


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
def test_every_stage_spec_names_real_config_paths(spec):
    cfg = load_config(None)
    view = StageConfig(cfg, spec.reads, spec.name)
    assert set(view.key_data()) == set(spec.reads)  # every declared path exists in the schema
    key = (spec.key_config or StageConfig.key_data)(view)
    assert key is not None


def test_code_hash_follows_imports_and_ignores_docstrings_and_comments(tmp_path, monkeypatch):
    package = tmp_path / "tasks_probe_pkg"
    monkeypatch.setattr(stage, "PROJECT_PACKAGES", ("tasks_probe_pkg",))
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "helper.py").write_text('"""Helper."""\n\ndef f():\n    return 1\n')
    (package / "unused.py").write_text("X = 1\n")
    (package / "node.py").write_text("def run():\n    from tasks_probe_pkg.helper import f  # lazy\n    return f()\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    stage._module_hashes.clear()
    assert modules_reached("tasks_probe_pkg.node") == ["tasks_probe_pkg.helper", "tasks_probe_pkg.node"]
    before = code_hash("tasks_probe_pkg.node")

    def rehash(file, text):
        (package / file).write_text(textwrap.dedent(text))
        stage._module_hashes.clear()
        return code_hash("tasks_probe_pkg.node")

    assert rehash("helper.py", '"""A new docstring."""\n\n# a comment\ndef f():\n    """Says one."""\n    return 1\n') == before
    assert rehash("unused.py", "X = 2\n") == before  # not imported: not this stage's code
    assert rehash("helper.py", "def f():\n    return 2\n") != before
    stage._module_hashes.clear()
    sys.modules.pop("tasks_probe_pkg", None)


def test_stages_reach_their_libraries_and_not_each_other():
    assert "tasks.lib.modeling" in modules_reached("tasks.validate")  # the tokenizer policy shapes the artifact
    assert "tasks.lib.model_card" not in modules_reached("tasks.evaluate_published")
    assert "tasks.lib.hub" not in modules_reached("tasks.evaluate")
    for spec in SPECS:
        reached = modules_reached(spec.module)
        assert not [m for m in reached if m.startswith("tasks.") and not m.startswith("tasks.lib")
                    and m != spec.module], (spec.name, reached)


# What each stage's code hash covers (besides tasks.lib.{artifacts,log,stage}, which every stage reaches). A new
# import that widens a stage's reach shows here: an edit to a module a stage does not run must not re-run it.
# (tasks.lib.tracking is not in train's: metric_loggers imports it by name, as where the curves go changes no weight.)
REACHED = {
    "tasks.validate": "chat contracts datarows mixture modeling packing prep ranks",
    "tasks.train": "chat checkpoints datarows lora_settings metric_loggers metrics modeling packing ranks trainer",
    "tasks.evaluate": "chat datarows gguf_export gptq jsonfile lora_settings metrics modeling packing ranks "
                      "release_models scores scoring serving",
    "tasks.merge": "datarows modeling nf4_merge",
    "tasks.quantize": "datarows gptq modeling",
    "tasks.export_gguf": "gguf_export lora_settings modeling serving",
}


@pytest.mark.parametrize("module", sorted(REACHED))
def test_each_stage_reaches_exactly_the_libraries_it_runs(module):
    reached = {m.removeprefix("tasks.lib.") for m in modules_reached(module)} - {module, "tasks.lib"}
    assert reached - {"artifacts", "log", "stage"} == set(REACHED[module].split()), sorted(reached)
    if module in ("tasks.validate", "tasks.train", "tasks.merge"):  # they never load a quantized model
        assert not {"gptq", "release_models"} & reached


def test_a_cache_hit_is_reported_to_prefect_as_cached(tmp_path):
    from tasks.lib.artifacts import ArtifactRef

    ref = ArtifactRef(uri="file:///x/objects/" + "0" * 64, sha256="0" * 64, kind="toy")
    hit = stage.reported(stage.StageResult(stage="toy", ref=ref, cache_hit=True, seconds=0.0))
    built = stage.reported(stage.StageResult(stage="toy", ref=ref, cache_hit=False, seconds=1.0))
    assert (hit.name, hit.is_completed(), built.name) == ("Cached", True, "Completed")
    assert hit.result().ref == ref
