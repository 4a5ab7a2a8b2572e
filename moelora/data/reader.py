"""Read PromptCBLUE-format JSON Lines with `datasets` and stop at the first bad row with its file
and line, before any model is loaded."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import datasets
from datasets import Dataset

from moelora.atomic import error_words
from moelora.errors import UserError

REQUIRED = ("input", "target", "task_dataset")
COLUMNS = (*REQUIRED, "answer_choices", "task_type", "sample_id")


def resolve_files(root: str, files: list[str], key: str) -> list[Path]:
    """`root`-relative files (or folders of *.json/*.jsonl), each of which must exist."""
    base = Path(root)
    if not base.is_dir():
        raise UserError(
            f"data.root='{root}' is not a folder; point data.root at the folder that holds {files}."
        )
    paths: list[Path] = []
    for name in files:
        path = base / name
        if is_saved_dataset(path):
            paths.append(path)
        elif path.is_dir():
            paths += sorted(p for p in path.iterdir() if p.suffix in {".json", ".jsonl"})
        elif path.is_file():
            paths.append(path)
        elif path.is_symlink():
            raise UserError(
                f"{key} names '{name}', but {path} is a symbolic link that leads nowhere (a loop "
                f"or a missing target); point it at the data file."
            )
        else:
            raise UserError(f"{key} names '{name}', but {path} does not exist; fix {key}.")
    if not paths:
        raise UserError(f"{key} matched no .json/.jsonl files under {root}.")
    return paths


def is_saved_dataset(path: Path) -> bool:
    """A folder written by `Dataset.save_to_disk` (read with `load_from_disk`)."""
    return (path / "state.json").is_file() and (path / "dataset_info.json").is_file()


def check_text_file(path: Path) -> None:
    """Stop on a file that cannot be read or is not UTF-8, naming its line: `datasets` would
    keep the bad bytes and fail far from the file. A byte-order mark and CRLF line ends are
    fine."""
    try:
        data = path.read_bytes()
    except OSError as err:
        raise UserError(
            f"{path} cannot be read ({error_words(err)}); fix its permissions or point the data "
            f"config at a readable file."
        ) from None
    if not data:
        raise UserError(f"{path} is empty; it must hold one JSON object per line.")
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise UserError(
            f"{path}:{line} is not UTF-8 text (byte 0x{data[err.start]:02x}); save the file as "
            f"UTF-8."
        ) from None


def _first_bad_json_line(path: Path) -> str:
    with open(path, encoding="utf-8-sig") as handle:
        for number, line in enumerate(handle, 1):
            if line.strip():
                try:
                    json.loads(line)
                except json.JSONDecodeError as err:
                    return f"{path}:{number} is not valid JSON ({err.msg})"
    return f"{path} could not be read as JSON Lines"


def read_rows(path: Path, needs_target: bool = True) -> Dataset:
    """One JSON/JSONL file (or a `save_to_disk` folder) as a Dataset with the six PromptCBLUE
    columns; a row missing a required field, a non-JSON line or an empty file stops with the
    file and line (row number for a saved dataset). Without `needs_target` (rows to answer, such
    as a test split) a missing target reads as ""."""
    datasets.disable_progress_bars()
    if is_saved_dataset(path):
        return normalise(datasets.load_from_disk(str(path)), str(path), needs_target)
    check_text_file(path)
    # datasets logs a parser failure with its traceback before raising; our line says it all.
    json_logger = logging.getLogger("datasets.packaged_modules.json.json")
    was_disabled, json_logger.disabled = json_logger.disabled, True
    try:
        rows = datasets.load_dataset("json", data_files=str(path), split="train")
    except Exception as err:  # datasets wraps parser errors in several types
        raise UserError(_first_bad_json_line(path) + "; fix or remove that line.") from err
    finally:
        json_logger.disabled = was_disabled
    return normalise(rows, str(path), needs_target)


def normalise(rows: Dataset, where: str, needs_target: bool = True) -> Dataset:
    """Check the required fields (naming `where:line` of the first bad row) and fill the
    optional ones, leaving exactly the six PromptCBLUE columns."""
    if len(rows) == 0:
        raise UserError(f"{where} has no rows; it must hold one JSON object per line.")
    if not needs_target:
        if "target" not in rows.column_names:
            rows = rows.add_column("target", [""] * len(rows))
        rows = rows.map(lambda r: {"target": r["target"] or ""})
    for column in REQUIRED:
        if column not in rows.column_names:
            raise UserError(f"{where}:1 has no '{column}' field; every row needs {REQUIRED}.")
        missing = [i for i, v in enumerate(rows[column]) if v is None]
        if missing:
            raise UserError(
                f"{where}:{missing[0] + 1} has no '{column}' field; every row needs {REQUIRED}."
            )
        not_text = [i for i, v in enumerate(rows[column]) if not isinstance(v, str)]
        if not_text:
            raise UserError(
                f"{where}:{not_text[0] + 1} has a '{column}' that is not text; write it as a "
                f"JSON string."
            )
    if "answer_choices" not in rows.column_names:
        rows = rows.add_column("answer_choices", [None] * len(rows))
    if "task_type" not in rows.column_names:
        rows = rows.add_column("task_type", [""] * len(rows))
    if "sample_id" not in rows.column_names:
        name = where.rsplit("/", 1)[-1]
        rows = rows.add_column("sample_id", [f"{name}-{i}" for i in range(len(rows))])
    rows = rows.map(
        lambda r: {"task_type": r["task_type"] or "", "sample_id": str(r["sample_id"])},
    )
    return rows.select_columns(list(COLUMNS))


def load_named_split(name: str, split: str, key: str, needs_target: bool = True) -> Dataset:
    """One split of a `datasets` dataset: a hub name or a local folder of data files."""
    datasets.disable_progress_bars()
    try:
        rows = datasets.load_dataset(name, split=split)
    except ValueError as err:
        raise UserError(
            f"{key}='{split}' is not a split of data.dataset='{name}' ({err})."
        ) from None
    except Exception as err:  # offline hub, missing folder, bad files
        raise UserError(
            f"could not load data.dataset='{name}' ({type(err).__name__}); point it at a local "
            f"folder of data files, or download the dataset on a machine with network."
        ) from None
    return normalise(rows, f"{name}[{split}]", needs_target)


def load_split(
    root: str, files: list[str], key: str, tasks: list[str] | None, needs_target: bool = True
) -> Dataset:
    """All files of one split, concatenated, restricted to `tasks` when given."""
    parts = [read_rows(path, needs_target) for path in resolve_files(root, files, key)]
    rows = datasets.concatenate_datasets(parts) if len(parts) > 1 else parts[0]
    return only_tasks(rows, tasks, key)


def only_tasks(rows: Dataset, tasks: list[str] | None, key: str) -> Dataset:
    """The rows of `tasks` (all rows when None); a chosen task with no rows is an error."""
    if tasks is not None:
        present = set(rows["task_dataset"])
        absent = [t for t in tasks if t not in present]
        if absent:
            raise UserError(
                f"the task(s) {absent} chosen by the config have zero rows in {key}; "
                f"tasks present: {sorted(present)}."
            )
        keep = set(tasks)
        rows = rows.filter(lambda r: r["task_dataset"] in keep)
    return rows
