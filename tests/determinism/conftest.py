"""Prints how many artifacts the determinism suite compared (for CI logs)."""


def pytest_terminal_summary(terminalreporter):
    from test_determinism import COMPARED

    if COMPARED:
        terminalreporter.write_line(f"determinism suite: {len(COMPARED)} stages run twice (two processes, different PYTHONHASHSEED), "
                                    f"{2 * len(COMPARED)} artifacts compared byte for byte")
