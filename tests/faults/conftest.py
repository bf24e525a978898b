"""Prints the fault suite's counts (for CI logs)."""

from collections import Counter

from helpers import tallied


def pytest_terminal_summary(terminalreporter):
    counts = sum(map(Counter, tallied(terminalreporter, "fault_counts")), Counter())
    if counts["trials"]:
        terminalreporter.write_line(
            f"fault suite: {counts['trials']} kill -9 trials, {counts['running_when_killed']} of them while the process "
            f"still ran ({counts['renamed_before_kill']} after its output was renamed into place, verified whole); "
            f"{counts['complete_outputs_verified']} complete runs verified; every rerun succeeded")
