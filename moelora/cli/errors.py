"""How a command ends on a mistake: one line on standard error and an exit status, never a
traceback; Hydra's composition errors read as a sentence naming the key and its owner."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator

from moelora.errors import RunStopped, UserError


@contextlib.contextmanager
def one_line_errors(command: str) -> Iterator[None]:
    """A user's mistake (exit 2), a run stopped on purpose or by a failed write (its own exit
    code) or an unforeseen file error (exit 2) ends the command with one line on standard
    error, not a traceback."""
    try:
        yield
    except UserError as err:
        print(f"moelora {command}: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    except RunStopped as stop:
        print(f"moelora {command}: stopped: {stop}", file=sys.stderr)
        raise SystemExit(stop.exit_code) from None
    except OSError as err:  # a file fault no check foresaw: still one line, naming the file
        from moelora.atomic import error_words

        where = f"{err.filename}: " if err.filename else ""
        print(
            f"moelora {command}: error: {where}{error_words(err)}; check that path, its "
            f"permissions and the free space under it.",
            file=sys.stderr,
        )
        raise SystemExit(2) from None


def config_error(err: Exception) -> str:
    """One line for Hydra's composition errors; a key the chosen schema lacks gets a sentence
    that names it, its owner (the method for `method.*`) and the fix."""
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError

    cause = err.__cause__
    missing_key = isinstance(cause, ConfigKeyError | ConfigAttributeError)
    if missing_key and cause.full_key and cause.object_type is not None:
        return _unknown_key(cause.full_key, cause.object_type)
    text = str(err).split("Config search path:")[0]
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if len(lines) > 2 and lines[1].endswith(":"):  # a heading over a list of options
        lines = [lines[0], f"{lines[1]} {', '.join(lines[2:])}"]
    if cause is not None:
        lines.append(str(cause).splitlines()[0])
    return "; ".join(lines)


def _unknown_key(full_key: str, owner: type) -> str:
    from dataclasses import fields

    from moelora.adapters.methods import METHOD_REGISTRY

    key = full_key.rsplit(".", 1)[-1]
    methods = {m.config_class: name for name, m in METHOD_REGISTRY.items()}
    if owner in methods:
        having = sorted(
            n for n, m in METHOD_REGISTRY.items() if key in m.config_class.__dataclass_fields__
        )
        fix = (
            f"choose a method that has it ({', '.join(having)})" if having else "check its spelling"
        )
        return f"{full_key} is not a setting of method {methods[owner]}; remove it or {fix}."
    own = ", ".join(f.name for f in fields(owner)) if hasattr(owner, "__dataclass_fields__") else ""
    return f"{full_key} is not a setting ({owner.__name__} has {own}); check its spelling."
