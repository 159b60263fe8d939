"""Stage 5b, export-gguf (release.formats: gguf): the merged model as GGUF files for llama.cpp and Ollama, made by
llama.cpp's own converter (`tasks/lib/gguf_export.py` says which, and why), plus an Ollama Modelfile.

The files are scored like every other model by evaluate-quantized and held to the `gguf-perplexity-increase` gate;
the downstream tests load them in llama.cpp (tests/test_serving_engines.py).
"""

from __future__ import annotations

import json
from pathlib import Path

from prefect import task
from prefect.cache_policies import NONE

from pipeline_config import PipelineConfig
from tasks.lib import gguf_export, log, modeling
from tasks.lib.artifacts import ArtifactStore
from tasks.lib.stage import StageConfig, StageResult, StageSpec, reported, run_stage

EXPORT_GGUF = StageSpec("export-gguf", __name__, reads=("release.gguf_types",))

def export_gguf(cfg: StageConfig, merged_dir: Path, out_dir: Path, model_name: str) -> dict:
    files = {}
    for gguf_type in cfg.release.gguf_types:
        name = gguf_export.file_name(gguf_type)
        gguf_export.convert(merged_dir, out_dir / name, gguf_type, model_name)
        files[gguf_type] = {"file": name, "bytes": (out_dir / name).stat().st_size,
                            **gguf_export.read_metadata(out_dir / name)}
        log.logger().info("export-gguf: %s, %.0f MB", name, files[gguf_type]["bytes"] / 1e6)
    first = gguf_export.file_name(cfg.release.gguf_types[0])
    try:
        (out_dir / "Modelfile").write_text(gguf_export.ollama_modelfile(modeling.load_tokenizer(merged_dir), first))
        modelfile = {"file": "Modelfile", "from": first}
    except gguf_export.TemplateNotExpressible as error:
        modelfile = {"file": None, "reason": f"no Ollama Modelfile: {error}"}
        log.logger().warning("export-gguf: %s", modelfile["reason"])
    record = {"converter": {"package": f"{gguf_export.CONVERTER_PACKAGE}=={gguf_export.CONVERTER_VERSION}",
                            "llama_cpp_commit": gguf_export.LLAMA_CPP_COMMIT,
                            "script": "convert_hf_to_gguf.py"},
              "files": files, "modelfile": modelfile}
    (out_dir / gguf_export.RECORD).write_text(json.dumps(record, indent=1))
    return record


@task(name="export-gguf", retries=1, retry_delay_seconds=5, cache_policy=NONE)
def export_gguf_task(cfg: PipelineConfig, merged: StageResult):
    store = ArtifactStore(cfg.artifacts.root)
    return reported(run_stage(
        EXPORT_GGUF, store, cfg, inputs={"merged": merged.ref.payload},
        # Named by the merged model's payload: what it is, not where the store keeps it.
        build=lambda view, workdir, key: export_gguf(view, store.local_path(merged.ref), workdir,
                                                     f"qlora-merged-{merged.ref.payload[:12]}"),
    ))
