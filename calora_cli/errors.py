"""The one error type users see: a one-line message and exit code 2."""


class CaloraError(Exception):
    """Bad input or a refused operation. The CLI prints `calora: error: <message>` and exits 2."""

    exit_code = 2

