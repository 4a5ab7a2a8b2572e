"""Every file a run writes goes through here, so that a write either completes or leaves nothing
behind: the content goes to a hidden temporary sibling, which one rename puts in place. A write
that fails (disk full, permissions, a read-only filesystem) removes its temporary output, keeps
the previous good file, and stops the run in one line naming the file, the error and the fix.
Temporaries left by a killed process are swept by `clean_leftovers` at the next start."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from moelora.errors import STOPPED_EXIT_CODE, RunStopped

TMP_MARK = ".moelora-tmp-"  # .<name>.moelora-tmp-<pid>: being written
OLD_MARK = ".moelora-old-"  # .<name>.moelora-old-<pid>: a replaced folder, removed right after
FULL_BELOW_BYTES = 2**20  # a write error with less free space than this is a full disk


class WriteFailed(RunStopped):
    """A write that could not complete; what was there before is unchanged."""

    def __init__(self, path: Path, err: BaseException) -> None:
        super().__init__(
            f"writing {path} failed ({error_words(err)}); the earlier files are intact; free "
            f"space under {path.parent} or fix its permissions, then run the same command again "
            f"(trainer.resume=auto continues a training run from its last checkpoint).",
            STOPPED_EXIT_CODE,
        )
        self.path = path


def error_words(err: BaseException, where: Path | None = None) -> str:
    """The errno's words ("No space left on device") for an OSError or an error that carries an
    OS error code in its text (safetensors' IoError); else its first line. torch's writer says
    only "unexpected pos" on a full disk: when the disk under `where` is (nearly) full, that is
    what is said."""
    code = getattr(err, "errno", None)
    if code is None:
        found = re.search(r"(?:code: |errno:? ?|Errno )(\d+)", str(err))
        code = int(found.group(1)) if found else None
    if code is None and where is not None and _nearly_full(where):
        code = errno.ENOSPC
    if code:
        return os.strerror(code)
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _nearly_full(where: Path) -> bool:
    probe = next((p for p in (where, *where.parents) if p.exists()), None)
    return probe is not None and shutil.disk_usage(probe).free < FULL_BELOW_BYTES


def io_errors() -> tuple[type[BaseException], ...]:
    """What a failed read or write raises: OSError, and safetensors' own error type."""
    from safetensors import SafetensorError

    return OSError, SafetensorError


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _commit(tmp: Path, path: Path) -> None:
    """Put the finished `tmp` where `path` is; a folder is swapped through a hidden old name."""
    if path.is_dir() and not path.is_symlink():
        old = path.with_name(f".{path.name}{OLD_MARK}{os.getpid()}")
        _remove(old)
        path.rename(old)
        tmp.rename(path)
        _remove(old)
    else:
        os.replace(tmp, path)


@contextmanager
def atomic(path: str | Path) -> Iterator[Path]:
    """A temporary sibling of `path` to write a file or a folder to; when the block ends it
    replaces `path`. On a write error the temporary goes, `path` is untouched, and the run stops
    with `WriteFailed`; on any other error the temporary goes too."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}{TMP_MARK}{os.getpid()}")
    _remove(tmp)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        yield tmp
        _commit(tmp, path)
    except io_errors() as err:
        _remove(tmp)
        raise WriteFailed(path, err) from None
    except BaseException:
        _remove(tmp)
        raise


def write_text(path: str | Path, text: str) -> None:
    with atomic(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | Path, data: object) -> None:
    write_text(path, json.dumps(data, ensure_ascii=False, indent=2))


def _append(path: Path, data: bytes) -> None:
    with path.open("ab") as handle:
        handle.write(data)


def append_text(path: str | Path, text: str) -> None:
    """Add `text` to the end of `path`; a failed append is cut back to the old end."""
    path = Path(path)
    size = path.stat().st_size if path.exists() else 0
    try:
        _append(path, text.encode("utf-8"))
    except OSError as err:
        if path.exists():
            with path.open("r+b") as handle:
                handle.truncate(size)
        raise WriteFailed(path, err) from None


def clean_leftovers(folder: str | Path) -> list[Path]:
    """Remove the temporaries that a killed process left in `folder`; a folder caught between
    its two renames gets its old copy back. Only the process that owns the folder calls this
    (it holds the run's lock). Returns what was removed."""
    folder, removed = Path(folder), []
    if not folder.is_dir():
        return removed
    for entry in sorted(folder.iterdir()):
        name = entry.name
        if TMP_MARK in name:
            _remove(entry)
            removed.append(entry)
        elif OLD_MARK in name:
            original = folder / name[1:].split(OLD_MARK)[0]
            if original.exists():
                _remove(entry)
                removed.append(entry)
            else:
                entry.rename(original)
    return removed
