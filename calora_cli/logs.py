"""Where messages go: calora's own warnings (each module logs to `logging.getLogger(__name__)`) and
library warnings, one line each on stderr, never on stdout; `--quiet` hides both, `--debug` adds
the libraries' own loggers."""

from __future__ import annotations

import logging
import sys
import warnings

# libraries that log their progress and choices at INFO/WARNING level: calora reports progress itself
NOISY_LOGGERS = ("torchao", "torch.utils._pytree", "gptqmodel", "transformers", "peft", "optimum", "accelerate")
# warnings meant for a library's maintainers, not for someone running a command
FOR_DEVELOPERS = (DeprecationWarning, PendingDeprecationWarning, FutureWarning, SyntaxWarning, ResourceWarning)


class _Stderr(logging.Handler):
    """Writes to whatever sys.stderr is when a record comes (tests and commands swap it)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            print(f"calora: {record.levelname.lower()}: {record.getMessage()}", file=sys.stderr)
        except Exception:  # pragma: no cover - logging must never break a command
            self.handleError(record)


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    origin = filename.rsplit("site-packages/", 1)[-1].split("/", 1)[0].removesuffix(".py")
    text = str(message).strip().splitlines()[0] if str(message).strip() else category.__name__
    print(f"calora: warning: {text} ({category.__name__} from {origin})", file=sys.stderr)


def configure(quiet: bool = False, debug: bool = False) -> None:
    """Set up calora's logger and the warnings filter for one command; idempotent."""
    root = logging.getLogger("calora_cli")
    for h in [h for h in root.handlers if isinstance(h, _Stderr)]:
        root.removeHandler(h)
    root.addHandler(_Stderr())
    root.propagate = False
    root.setLevel(logging.DEBUG if debug else logging.ERROR if quiet else logging.WARNING)
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING if debug else logging.ERROR)
    warnings.resetwarnings()
    if quiet:
        warnings.simplefilter("ignore")
        return
    warnings.simplefilter("default" if debug else "once")  # once: the same message is shown one time
    if not debug:
        for category in FOR_DEVELOPERS:
            warnings.filterwarnings("ignore", category=category)
    warnings.showwarning = _show_warning
