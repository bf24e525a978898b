"""Prints how many bad-input cases ran (the suite's count, for CI logs)."""

from helpers import tallied


def pytest_terminal_summary(terminalreporter):
    ran = tallied(terminalreporter, "bad_input")
    if ran:
        terminalreporter.write_line(f"bad-input suite: {len(ran)} cases, each exit 2 with one line and nothing written")
