"""Prints the fault suite's counts (for CI logs)."""


def pytest_terminal_summary(terminalreporter):
    from test_faults import COUNTS

    if COUNTS["trials"]:
        terminalreporter.write_line(
            f"fault suite: {COUNTS['trials']} kill -9 trials, {COUNTS['running_when_killed']} of them while the process "
            f"still ran ({COUNTS['renamed_before_kill']} after its output was renamed into place, verified whole); "
            f"{COUNTS['complete_outputs_verified']} complete runs verified; every rerun succeeded")
