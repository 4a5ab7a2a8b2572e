"""The exceptions the CLI turns into one line: mistakes a user can fix (bad config, missing file,
bad data row), and runs that stopped on purpose (a signal, a diverging loss)."""

# The exit status of a run that stopped before its end with its files in order (a diverging
# loss, a failed write); a signal's stop exits with 128 + its number instead.
STOPPED_EXIT_CODE = 3


class UserError(ValueError):
    """Raised with one sentence that names the field or file and says what to do; the CLI prints
    it without a traceback and exits with status 2."""


class DamagedFile(UserError):
    """A file that is there but cannot be read whole (cut short, damaged, not what its name
    says); `words` is the reader's reason, for callers that name the file's owner instead."""

    def __init__(self, path: object, words: str, fix: str) -> None:
        super().__init__(f"{path} cannot be read ({words}): it is damaged or was cut short; {fix}")
        self.path, self.words = path, words


class RunStopped(Exception):
    """A run stopped before its end, on purpose and with its checkpoints in order; the CLI
    prints the message in one line and exits with `exit_code`."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def check_choice(key: str, value: object, allowed: tuple[str, ...]) -> None:
    """Each schema checks its own values in `__post_init__`: at start, naming the key."""
    if value not in allowed:
        raise UserError(f"{key}='{value}' is unknown; use one of {', '.join(allowed)}.")


def check_range(
    key: str,
    value: float | None,
    low: float | None = None,
    high: float | None = None,
    *,
    above: bool = False,
    below: bool = False,
    optional: bool = False,
) -> None:
    """Stop on a number outside [low, high] (`above`: low excluded, `below`: high excluded);
    None passes when `optional`. The message names the key and the range to pick from."""
    if value is None and optional:
        return
    bad = value is None or isinstance(value, bool)
    if not bad and low is not None:
        bad = value <= low if above else value < low
    if not bad and high is not None:
        bad = value >= high if below else value > high
    if not bad:
        return
    parts = []
    if low is not None:
        parts.append(f"{'greater than' if above else 'at least'} {low}")
    if high is not None:
        parts.append(f"{'below' if below else 'at most'} {high}")
    rule = " and ".join(parts) + (" (or null)" if optional else "")
    raise UserError(f"{key}={value} is out of range; set it {rule}.")
