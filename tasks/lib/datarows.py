"""Rows in, conversations out: reading data files with their line numbers, detecting the row format, and
normalizing every format (alpaca, prompt/completion, chat messages, ShareGPT) to one conversation of
``{role, content}`` turns. The validate artifact stores rows in that canonical form, ``{"messages": [...]}``,
which every later stage reads."""

from __future__ import annotations

import json
from io import StringIO
from pathlib import Path
from typing import Any, Iterator

import pandas as pd

LINE_COLUMN = "line"


FORMATS = ("alpaca", "prompt-completion", "messages")


SUPPORTED_FORMATS = ("auto", *FORMATS)


# ShareGPT's from/value turns, mapped to role/content; an unknown "from" stays as it is (and the
# contract's roles-known rule names it).
SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "system": "system", "user": "user", "assistant": "assistant"}


DATASET_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")


class DataError(Exception):
    """Input rows or a contract file are unusable; the message is one line naming path and line."""


def load_rows(path: Path, fmt: str = "alpaca") -> pd.DataFrame:
    """Read training rows into a DataFrame with a ``line`` column (1-based source line/row).

    ``.jsonl``/``.ndjson``: one JSON object per line, blank lines skipped, ``line`` is the file line.
    ``.json``: a list of objects; ``.parquet``: a table; for both ``line`` is row index + 1.
    ``.csv``: header on line 1, so ``line`` of the first data row is 2 (quoted multi-line
    fields shift later numbers; good enough for locating rows).
    """
    path = Path(path)
    if fmt not in SUPPORTED_FORMATS:
        raise DataError(f"{path}: unknown row format {fmt!r} (supported: {', '.join(SUPPORTED_FORMATS)})")
    suffix = path.suffix.lower()
    if path.is_dir() or "#" in path.name or (not suffix and not path.exists()):  # datasets folder or id
        rows, line_numbers = _read_dataset(str(path))
        return _with_lines(path, rows, line_numbers)
    readers = {
        ".jsonl": _read_jsonl,
        ".ndjson": _read_jsonl,
        ".json": _read_json_array,
        ".csv": _read_csv,
        ".parquet": _read_parquet,
    }
    if suffix not in readers:
        raise DataError(
            f"{path}: unsupported file type {suffix or '(none)'!r} (expected one of {', '.join(readers)})"
        )
    if not path.exists():
        raise DataError(f"{path}: file not found")
    if not path.is_file():
        raise DataError(f"{path}: not a regular file")

    rows, line_numbers = readers[suffix](path)
    return _with_lines(path, rows, line_numbers)


def _block(path: Path, records: list[dict], line_numbers: list[int], dtypes: dict) -> pd.DataFrame:
    frame = pd.DataFrame.from_records(records, columns=list(dtypes))
    for column, dtype in dtypes.items():
        if frame[column].dtype != dtype:
            frame[column] = frame[column].astype(dtype)
    return _with_lines(path, frame, line_numbers)


def _with_lines(path: Path, rows: pd.DataFrame, line_numbers: list[int]) -> pd.DataFrame:
    if rows.empty:
        raise DataError(f"{path}: empty file (no rows)")
    if LINE_COLUMN in rows.columns:
        raise DataError(f"{path}: column {LINE_COLUMN!r} is reserved for source line numbers")
    rows.insert(0, LINE_COLUMN, line_numbers)
    return rows


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as error:
        raise DataError(f"{path}: cannot read file ({error.strerror})") from error


def _decode_utf8(path: Path) -> str:
    raw = _read_bytes(path)
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line_number = raw.count(b"\n", 0, error.start) + 1
        bad_byte = raw[error.start]
        raise DataError(f"{path}:{line_number}: not valid UTF-8 (byte 0x{bad_byte:02x})") from error


def _read_jsonl(path: Path) -> tuple[pd.DataFrame, list[int]]:
    records: list[dict[str, Any]] = []
    line_numbers: list[int] = []
    for line_number, record in _jsonl_records(path):
        records.append(record)
        line_numbers.append(line_number)
    return pd.DataFrame.from_records(records), line_numbers


def _jsonl_records(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) of each non-blank line. Read a line at a time: the file's bytes, their text and its
    lines held at once were 1.4 GB for a million alpaca rows. newline="\n" splits on "\n" only, as split("\n")
    did: splitlines (and universal newlines) also break on "\r" and U+2028, which JSON strings may hold."""
    try:
        with open(path, encoding="utf-8-sig", newline="\n") as f:
            for line_number, text in enumerate(f, start=1):
                if not text.strip():
                    continue
                try:
                    record = json.loads(text)
                except json.JSONDecodeError as error:
                    raise DataError(
                        f"{path}:{line_number}: malformed JSON ({error.msg} at column {error.colno})"
                    ) from error
                if not isinstance(record, dict):
                    raise DataError(f"{path}:{line_number}: expected a JSON object, got {_json_type_name(record)}")
                yield line_number, record
    except UnicodeDecodeError:
        _decode_utf8(path)  # raises the DataError naming the line and the byte
        raise
    except OSError as error:
        raise DataError(f"{path}: cannot read file ({error.strerror})") from error


def row_blocks(path: Path, fmt: str, block_rows: int) -> Iterator[pd.DataFrame]:
    """The rows of a data file as load_rows reads them, in frames of at most block_rows rows (index 0..n-1), so
    what is derived from the rows (conversations, tokens, the contract's columns) is held for one block at a time.

    JSON Lines is read in two passes. The first collects the file's columns and the kinds of values each holds, so
    every block has every column (a row without a key gets NaN there) in the dtype pandas gives it in a frame of the
    whole file: a block of only missing or only whole numbers must not turn a text or decimal column into a float or
    integer one, or the contract's type rules would judge the blocks by another schema than the file's. Other formats
    are read whole, as load_rows does, and sliced."""
    path = Path(path)
    if path.suffix.lower() in (".jsonl", ".ndjson") and path.is_file() and "#" not in path.name:
        if fmt not in SUPPORTED_FORMATS:
            raise DataError(f"{path}: unknown row format {fmt!r} (supported: {', '.join(SUPPORTED_FORMATS)})")
        kinds: dict[str, dict[type, Any]] = {}  # column -> {type of value: the first such value}
        present: dict[str, int] = {}
        rows = 0
        for _, record in _jsonl_records(path):
            for key, value in record.items():
                kinds.setdefault(key, {}).setdefault(type(value), value)
                present[key] = present.get(key, 0) + 1
            rows += 1
        if not rows:
            raise DataError(f"{path}: empty file (no rows)")
        if LINE_COLUMN in kinds:
            raise DataError(f"{path}: column {LINE_COLUMN!r} is reserved for source line numbers")
        # pandas infers a column's dtype from the kinds of its values, not their number: one of each kind (and NaN
        # where a row lacks the key) infers the whole column's dtype.
        dtypes = {column: pd.Series(list(values.values()) + ([float("nan")] if present[column] < rows else []),
                                    dtype=None).dtype for column, values in kinds.items()}
        records, line_numbers = [], []
        for line_number, record in _jsonl_records(path):
            records.append(record)
            line_numbers.append(line_number)
            if len(records) == block_rows:
                yield _block(path, records, line_numbers, dtypes)
                records, line_numbers = [], []
        if records:
            yield _block(path, records, line_numbers, dtypes)
        return
    frame = load_rows(path, fmt)
    for start in range(0, len(frame), block_rows):
        yield frame.iloc[start: start + block_rows].reset_index(drop=True)


def _read_json_array(path: Path) -> tuple[pd.DataFrame, list[int]]:
    try:
        document = json.loads(_decode_utf8(path))
    except json.JSONDecodeError as error:
        if not error.doc.strip():
            return pd.DataFrame(), []
        raise DataError(
            f"{path}:{error.lineno}: malformed JSON ({error.msg} at column {error.colno})"
        ) from error
    if not isinstance(document, list):
        raise DataError(f"{path}: expected a JSON array of objects, got {_json_type_name(document)}")
    for index, record in enumerate(document):
        if not isinstance(record, dict):
            raise DataError(f"{path}: item {index + 1} is {_json_type_name(record)}, expected a JSON object")
    return pd.DataFrame.from_records(document), list(range(1, len(document) + 1))


def _read_csv(path: Path) -> tuple[pd.DataFrame, list[int]]:
    text = _decode_utf8(path)
    if not text.strip():
        return pd.DataFrame(), []
    try:
        # All text, and empty cells stay "" rather than NaN, so "empty" and "missing" stay distinct.
        rows = pd.read_csv(StringIO(text), dtype=str, keep_default_na=False)
    except pd.errors.ParserError as error:
        raise DataError(f"{path}: malformed CSV ({error})") from error
    return rows, list(range(2, len(rows) + 2))


def _read_parquet(path: Path) -> tuple[pd.DataFrame, list[int]]:
    try:
        rows = pd.read_parquet(path)
    except (OSError, ValueError) as error:  # pyarrow's ArrowInvalid/ArrowIOError derive from these
        raise DataError(f"{path}: unreadable parquet file ({error})") from error
    return rows.reset_index(drop=True), list(range(1, len(rows) + 1))


def _read_dataset(spec: str) -> tuple[pd.DataFrame, list[int]]:
    """A local dataset folder (save_to_disk, or a folder of data files) or a dataset id, through
    `datasets`; ``NAME#SPLIT`` picks a split (default: train, else the only one)."""
    import datasets

    name, _, split = spec.partition("#")
    try:
        folder = Path(name)
        if folder.is_dir() and any((folder / marker).exists() for marker in DATASET_MARKERS):
            loaded = datasets.load_from_disk(str(folder))
        else:
            loaded = datasets.load_dataset(name)
    except Exception as error:  # noqa: BLE001 - datasets raises many types; all mean "cannot load"
        message = " ".join(str(error).split())[:300]
        raise DataError(f"{spec}: cannot load dataset ({type(error).__name__}: {message})") from error
    if isinstance(loaded, datasets.DatasetDict):
        splits = list(loaded)
        chosen = split or ("train" if "train" in loaded else splits[0] if len(splits) == 1 else "")
        if chosen not in loaded:
            raise DataError(f"{spec}: dataset has splits {', '.join(splits)}; name one as {name}#SPLIT")
        loaded = loaded[chosen]
    elif split and split != "train":
        raise DataError(f"{spec}: dataset has no split {split!r}")
    frame = loaded.to_pandas()
    return frame, list(range(1, len(frame) + 1))


def _json_type_name(value: Any) -> str:
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null"}
    return names.get(type(value), "a number")


DERIVED_COLUMNS = ("roles", "turn_problems", "text", "token_length")


def detect_format(frame: pd.DataFrame, source: Path | str) -> str:
    """The row format from the columns: messages/conversations, prompt+completion, or alpaca."""
    columns = set(frame.columns)
    if columns & {"messages", "conversations"}:
        return "messages"
    if {"prompt", "completion"} <= columns:
        return "prompt-completion"
    if {"instruction", "output"} & columns:
        return "alpaca"
    shown = ", ".join(sorted(str(c) for c in columns - {LINE_COLUMN})) or "(none)"
    raise DataError(
        f"{source}: cannot detect the row format from columns {shown}: expected instruction/input/output "
        "(alpaca), prompt/completion, or messages (or ShareGPT conversations); set data.format"
    )


def _describe(value: Any) -> str:
    if value is None or (isinstance(value, float) and value != value):
        return "null"
    return _json_type_name(value)


def _field_problem(name: str, value: Any, allow_empty: bool = False) -> str | None:
    if not isinstance(value, str):
        return f"{name} is {_describe(value)}, expected a string"
    if not allow_empty and not value.strip():
        return f"{name} is empty"
    return None


def normalize_rows(frame: pd.DataFrame, fmt: str) -> tuple[pd.DataFrame, list[list[dict] | None]]:
    """Add the derived columns the contracts check (``roles``, ``turn_problems``, ``text``) and
    return every row as a conversation, or None where the row cannot be rendered (the contract
    then says why). alpaca and prompt/completion rows become one user and one assistant turn;
    ShareGPT ``conversations`` of from/value become ``messages`` of role/content."""
    column = {"alpaca": None, "prompt-completion": None, "messages": "messages"}[fmt]
    if fmt == "messages" and "messages" not in frame.columns and "conversations" in frame.columns:
        column = "conversations"
    records = frame.to_dict(orient="records")
    conversations, roles, problems, texts = [], [], [], []
    for record in records:
        if fmt == "alpaca":
            turns, issues = _alpaca_turns(record)
        elif fmt == "prompt-completion":
            turns, issues = _pair_turns(record)
        else:
            turns, issues = _message_turns(record.get(column) if column in record else None, column)
        roles.append(",".join(str(t["role"]) for t in turns))
        problems.append("; ".join(issues))
        texts.append("\n".join(t["content"] for t in turns if isinstance(t["content"], str)))
        conversations.append(turns if not issues else None)
    out = frame.copy()
    out["roles"] = roles
    out["turn_problems"] = problems
    out["text"] = texts
    return out, conversations


def _alpaca_turns(record: dict) -> tuple[list[dict], list[str]]:
    issues = [p for p in (_field_problem("instruction", record.get("instruction")),
                          _field_problem("input", record.get("input", ""), allow_empty=True),
                          _field_problem("output", record.get("output"))) if p]
    if issues:
        return [], issues
    text = record["instruction"].strip()
    if record.get("input", "").strip():
        text = f"{text}\n\n{record['input'].strip()}"
    return [{"role": "user", "content": text}, {"role": "assistant", "content": record["output"].strip()}], []


def _pair_turns(record: dict) -> tuple[list[dict], list[str]]:
    issues = [p for p in (_field_problem("prompt", record.get("prompt")),
                          _field_problem("completion", record.get("completion"))) if p]
    if issues:
        return [], issues
    return [{"role": "user", "content": record["prompt"].strip()},
            {"role": "assistant", "content": record["completion"].strip()}], []


def _message_turns(value: Any, column: str) -> tuple[list[dict], list[str]]:
    if hasattr(value, "tolist") and not isinstance(value, str):  # parquet/arrow give numpy arrays
        value = value.tolist()
    if not isinstance(value, list):
        return [], [f"{column} is {_describe(value)}, expected a list of turns"]
    if not value:
        return [], [f"{column} is an empty list"]
    turns, issues = [], []
    for number, turn in enumerate(value, start=1):
        if not isinstance(turn, dict):
            issues.append(f"turn {number} is {_describe(turn)}, expected an object")
            continue
        if "role" in turn or "content" in turn:
            role, content = turn.get("role"), turn.get("content")
        elif "from" in turn or "value" in turn:
            role, content = turn.get("from"), turn.get("value")
            role = SHAREGPT_ROLES.get(role, role) if isinstance(role, str) else role
        else:
            issues.append(f"turn {number} has neither role/content nor from/value")
            continue
        if not isinstance(role, str):
            issues.append(f"turn {number} role is {_describe(role)}")
            role = "?"
        if (problem := _field_problem(f"turn {number} content", content)) is not None:
            issues.append(problem)
        else:
            content = content.strip()
        turns.append({"role": role, "content": content})
    return turns, issues


def read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def write_jsonl(path: Path, rows: list[dict]) -> None:
    write_lines(path, (json_line(row) for row in rows))


def json_line(row: dict) -> str:
    """A row as one JSONL line (without its newline), as every JSONL file here writes it."""
    return json.dumps(row, ensure_ascii=False)


def write_lines(path: Path, lines) -> None:
    """JSONL from rows already serialized by json_line."""
    with open(path, "w", encoding="utf-8") as f:
        for line in lines:
            f.write(line + "\n")


def read_lines(path: Path) -> list[str]:
    """A JSONL file's rows as their lines, unparsed (the inverse of write_lines)."""
    with open(path, encoding="utf-8") as f:
        return [line.rstrip("\n") for line in f if line.strip()]


def row_messages(row: dict) -> list[dict]:
    """The conversation of a row. Validated rows (the validate artifact's train/eval.jsonl) are canonical,
    ``{"messages": [{role, content}, ...]}``; a raw alpaca or prompt/completion row (a test's or a bench's) is
    converted by the same code validate uses, so there is one conversion."""
    if "messages" in row:
        return [{"role": m["role"], "content": m["content"]} for m in row["messages"]]
    convert = _pair_turns if "prompt" in row and "instruction" not in row else _alpaca_turns
    turns, issues = convert(row)
    if issues:
        raise DataError("; ".join(issues))
    return turns


def _last_assistant(messages: list[dict]) -> int:
    for index in range(len(messages) - 1, -1, -1):
        if messages[index]["role"] == "assistant":
            return index
    raise DataError("conversation has no assistant turn")


def prompt_messages(row: dict) -> list[dict]:
    """Every turn before the final assistant turn (what inference is given)."""
    messages = row_messages(row)
    return messages[: _last_assistant(messages)]


def reference_answer(row: dict) -> str:
    """The final assistant turn: what exact match compares a greedy answer with."""
    messages = row_messages(row)
    return messages[_last_assistant(messages)]["content"]


def render_prompt(tokenizer, row: dict) -> str:
    """The prompt text up to where the assistant's (final) answer starts."""
    return tokenizer.apply_chat_template(prompt_messages(row), tokenize=False, add_generation_prompt=True)


def render_chat(tokenizer, row: dict) -> str:
    """The whole conversation, answers included (training and calibration text)."""
    return tokenizer.apply_chat_template(row_messages(row), tokenize=False)
