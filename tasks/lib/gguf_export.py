"""GGUF files for llama.cpp and Ollama, made from the merged model by llama.cpp's own converter.

The converter. llama.cpp's `convert_hf_to_gguf.py` (with its `conversion/` package and its `gguf-py`) is the
program that defines how a Hugging Face checkpoint becomes GGUF: tensor names, Q/K permutations, tokenizer
metadata and pre-tokenizer hashes, chat template. It is not on PyPI as a package of its own: `gguf` 0.19.0 is
only the file library, and `convert-hf-to-gguf` is an unofficial repackaging that overwrites `gguf`. The
llama-cpp-python sdist vendors llama.cpp at a fixed commit, converter included, and PyPI files never change,
so it is fetched once by pip (from whatever index pip is configured with) into the user cache, checked against
the sha256 pinned here, and only the converter's files are extracted. It runs as a subprocess with its own
gguf-py first on its path (the script does that itself), so the installed `gguf` that transformers reads GGUF
with is untouched.

Types: f16, bf16 and q8_0 are written by the converter in Python. q4_k_m is made from the f16 file by
llama.cpp's compiled `llama-quantize`, which must be on PATH (preflight says so otherwise).

The Ollama Modelfile's TEMPLATE is derived from the tokenizer's chat template by rendering it around marker
strings: what surrounds each role's content, the generation prompt and a default system prompt. A template
whose turns cannot be written that way (roles folded into one another) is refused, naming the template.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from tasks.lib.artifacts import user_cache_dir

CONVERTER_PACKAGE, CONVERTER_VERSION = "llama-cpp-python", "0.3.36"
CONVERTER_SDIST_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
LLAMA_CPP_COMMIT = "0c1e57098bba43ac29e6e3b677cdceebdd22334f"  # vendor/llama.cpp in that sdist
CONVERTER_FILES = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/", "LICENSE")
CONVERTER_TYPES = ("f16", "bf16", "q8_0")
RECORD = "gguf.json"  # the export stage's record: converter, files and their metadata, Modelfile


def file_name(gguf_type: str) -> str:
    return f"model-{gguf_type}.gguf"


class GGUFError(RuntimeError):
    """The converter could not be had, or a conversion failed; the message says which and why."""


def converter_dir() -> Path:
    """In this user's cache (artifacts.user_cache_dir: 0700, refused if another user owns it): the converter
    is Python this process runs."""
    return user_cache_dir() / f"llama.cpp-convert-{LLAMA_CPP_COMMIT[:12]}"


def ensure_converter() -> Path:
    """The converter's folder, fetched and checked on first use (idempotent; safe against a concurrent fetch)."""
    folder = converter_dir()
    if (folder / "convert_hf_to_gguf.py").is_file():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".convert-", dir=folder.parent) as tmp:
        spec = f"{CONVERTER_PACKAGE}=={CONVERTER_VERSION}"
        done = subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
                               "--dest", tmp, spec], capture_output=True, text=True)
        sdists = list(Path(tmp).glob("*.tar.gz"))
        if done.returncode or len(sdists) != 1:
            raise GGUFError(f"could not fetch llama.cpp's converter ({spec} sdist) with pip: "
                            f"{(done.stderr or done.stdout).strip()[-400:]}")
        with sdists[0].open("rb") as f:
            digest = hashlib.file_digest(f, "sha256").hexdigest()
        if digest != CONVERTER_SDIST_SHA256:
            raise GGUFError(f"{sdists[0].name}: sha256 {digest}, expected {CONVERTER_SDIST_SHA256}; not used")
        extracted = Path(tmp) / "converter"
        prefix = f"llama_cpp_python-{CONVERTER_VERSION}/vendor/llama.cpp/"
        with tarfile.open(sdists[0]) as archive:
            members = []
            for member in archive.getmembers():
                inner = member.name.removeprefix(prefix)
                if member.name.startswith(prefix) and any(inner == f or (f.endswith("/") and inner.startswith(f))
                                                          for f in CONVERTER_FILES):
                    member.name = inner
                    members.append(member)
            archive.extractall(extracted, members=members, filter="data")
        try:
            extracted.rename(folder)
        except OSError:  # another process finished first
            if not (folder / "convert_hf_to_gguf.py").is_file():
                raise
    return folder


def convert(model_dir: Path, out_file: Path, gguf_type: str, model_name: str) -> None:
    """One GGUF file of gguf_type from the HF checkpoint in model_dir, named model_name. The converter writes
    metadata guessed from the folder's name (`general.name`, `general.finetune`...); in the store that name is the
    merged artifact's address, which changes with its timings, so the same weights would make different bytes.
    It reads the checkpoint through a link named model_name instead."""
    if gguf_type in CONVERTER_TYPES:
        with tempfile.TemporaryDirectory(prefix="qlora-gguf-src-") as tmp:
            named = Path(tmp) / model_name
            named.symlink_to(Path(model_dir).resolve(), target_is_directory=True)
            _run([sys.executable, str(ensure_converter() / "convert_hf_to_gguf.py"), str(named),
                  "--outtype", gguf_type, "--outfile", str(out_file), "--model-name", model_name],
                 f"convert_hf_to_gguf.py --outtype {gguf_type}")
        return
    from tasks.lib.serving import GGUF_COMPILED_TYPES

    quantizer = shutil.which("llama-quantize")
    if gguf_type not in GGUF_COMPILED_TYPES or quantizer is None:
        raise GGUFError(f"GGUF type {gguf_type} needs llama.cpp's llama-quantize on PATH")
    with tempfile.TemporaryDirectory(prefix="qlora-gguf-") as tmp:
        f16 = Path(tmp) / "model-f16.gguf"
        convert(model_dir, f16, "f16", model_name)
        _run([quantizer, str(f16), str(out_file), GGUF_COMPILED_TYPES[gguf_type]], f"llama-quantize {gguf_type}")


def _run(command: list[str], what: str) -> None:
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        raise GGUFError(f"{what} failed (exit {done.returncode}): {(done.stderr or done.stdout).strip()[-1500:]}")


def read_metadata(path: Path) -> dict:
    """The GGUF header fields a release is checked by: architecture, chat template, special tokens, file type."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))

    def value(key: str):
        field = reader.get_field(key)
        return None if field is None else field.contents()

    return {"architecture": value("general.architecture"), "file_type": value("general.file_type"),
            "chat_template": value("tokenizer.chat_template"), "eos_token_id": value("tokenizer.ggml.eos_token_id"),
            "bos_token_id": value("tokenizer.ggml.bos_token_id"), "tensors": len(reader.tensors)}


# --- Ollama ---------------------------------------------------------------------------------------------------

_MARK = {"system": "\x01SYSTEM\x01", "user": "\x01USER\x01", "assistant": "\x01ASSISTANT\x01", "user2": "\x01NEXT\x01"}


class TemplateNotExpressible(GGUFError):
    """The chat template's turns are not role-wise wrappers around their content."""


def turn_wrappers(tokenizer) -> dict:
    """What the chat template puts around each role's content: {role: (before, after)}, the generation prompt,
    and the system prompt it adds when a conversation has none (or None). Derived by rendering marker strings."""

    def render(messages, generation_prompt=False) -> str:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)

    convo = [{"role": "system", "content": _MARK["system"]}, {"role": "user", "content": _MARK["user"]},
             {"role": "assistant", "content": _MARK["assistant"]}, {"role": "user", "content": _MARK["user2"]}]
    text = render(convo)
    generation_prompt = render(convo, True)[len(text):]
    if not generation_prompt or any(text.count(m) != 1 for m in _MARK.values()):
        raise TemplateNotExpressible("the chat template does not render each message's content once in order")
    head, rest = text.split(_MARK["system"])
    sys_after_user_before, rest = rest.split(_MARK["user"])
    user_after_asst_before, rest = rest.split(_MARK["assistant"])
    asst_after_user_before, user_tail = rest.split(_MARK["user2"])
    if not user_after_asst_before.endswith(generation_prompt):
        raise TemplateNotExpressible("the generation prompt is not what opens an assistant turn")
    user_after = user_after_asst_before[: -len(generation_prompt)]
    # The text after a user turn closes it; what follows, up to the next content, opens the next turn.
    if not sys_after_user_before.startswith(user_after) or not asst_after_user_before.endswith(
            user_before := sys_after_user_before[len(user_after):]):
        raise TemplateNotExpressible("turns do not end with one common closing text")
    if user_tail != user_after:
        raise TemplateNotExpressible("the last user turn closes differently from the others")
    # A BOS the template writes as text, where the tokenizer adds one too: llama.cpp adds it itself
    # (tokenizer.ggml.add_bos_token), so the template must not.
    adds_bos = tokenizer.bos_token_id is not None and tokenizer("a")["input_ids"][:1] == [tokenizer.bos_token_id]
    bos = tokenizer.bos_token if adds_bos else ""
    head = head[len(bos):] if bos and head.startswith(bos) else head
    wrappers = {"system": (head, user_after), "user": (user_before, user_after),
                "assistant": (generation_prompt, asst_after_user_before[: -len(user_before)])}
    alone = render([{"role": "user", "content": _MARK["user"]}])
    prefix = alone.split(_MARK["user"])[0]
    prefix = prefix[len(bos):] if bos and prefix.startswith(bos) else prefix
    default_system = None
    if prefix != user_before:
        before, after = wrappers["system"]
        inner = prefix[: -len(user_before)] if user_before and prefix.endswith(user_before) else ""
        if not (inner.startswith(before) and inner.endswith(after)):
            raise TemplateNotExpressible("the template adds text before a lone user turn that is not a system turn")
        default_system = inner[len(before): len(inner) - len(after)]
    return {"wrappers": wrappers, "default_system": default_system}


def _go_string(text: str) -> str:
    return text.replace("{{", "{{ \"{{\" }}")


def ollama_modelfile(tokenizer, gguf_file: str) -> str:
    """An Ollama Modelfile for gguf_file (a path relative to the Modelfile): TEMPLATE from the chat template,
    the default system prompt as SYSTEM, and the end-of-turn texts as stop sequences."""
    turns = turn_wrappers(tokenizer)
    w = turns["wrappers"]
    branches = "".join(f'{{{{ {"if" if i == 0 else "else if"} eq .Role "{role}" }}}}{_go_string(w[role][0])}'
                       f'{{{{ .Content }}}}{_go_string(w[role][1])}'
                       for i, role in enumerate(("system", "user", "assistant")))
    template = f"{{{{- range .Messages }}}}{branches}{{{{ end }}}}{{{{ end }}}}{_go_string(w['assistant'][0])}"
    stops = sorted({s.strip() for s in (w["assistant"][1], tokenizer.eos_token or "") if s.strip()})
    lines = [f"FROM ./{gguf_file}", f'TEMPLATE """{template}"""']
    if turns["default_system"]:
        lines.append(f'SYSTEM """{turns["default_system"]}"""')
    lines += [f"PARAMETER stop {json.dumps(stop)}" for stop in stops]
    return "\n".join(lines) + "\n"
