"""User-facing errors: one line that names the problem and the fix."""


class HSSLError(Exception):
    """Bad input or environment the user can fix. The CLI prints ``error: <message>`` and exits 2."""

    exit_code = 2


class OutOfMemory(HSSLError):
    """Host or GPU memory ran out; the message says what to change. Exit code 3."""

    exit_code = 3

