"""The one exception type a user can cause; the CLI prints it as a single line."""


class HantError(Exception):
    """A problem the user can fix (bad spec, missing file, infeasible budget...).

    The message is one line that says what went wrong and what to do.
    """
