"""The one exception type for mistakes a user can fix (bad config, missing file, bad data row)."""


class UserError(ValueError):
    """Raised with one sentence that names the field or file and says what to do; the CLI prints
    it without a traceback and exits with status 2."""
