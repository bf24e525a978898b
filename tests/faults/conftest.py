"""Prints the fault suite's counts (for CI logs)."""


def pytest_terminal_summary(terminalreporter):
    from test_faults import COUNTS

    if COUNTS["trials"]:
        terminalreporter.write_line(
            f"fault suite: {COUNTS['trials']} kill -9 trials ({COUNTS['running_when_killed']} still running when killed; "
            f"{COUNTS['complete_outputs_verified']} outputs complete before the kill, verified), every rerun succeeded")
