"""The one error type users see: a one-line message and exit code 2."""


class CaloraError(Exception):
    """Bad input or a refused operation. The CLI prints `calora: error: <message>` and exits 2."""

    exit_code = 2


class NotBuiltYet(CaloraError):
    """A command whose implementation lands in a later issue."""

    def __init__(self, command: str, issue: int):
        super().__init__(f"`calora {command}` is not built yet (tracked in issue #{issue})")
