"""Prints how many artifacts the determinism suite compared (for CI logs)."""

from helpers import tallied


def pytest_terminal_summary(terminalreporter):
    compared = tallied(terminalreporter, "compared")
    if compared:
        terminalreporter.write_line(f"determinism suite: {len(compared)} stages run twice (two processes, different PYTHONHASHSEED), "
                                    f"{2 * len(compared)} artifacts compared byte for byte")
