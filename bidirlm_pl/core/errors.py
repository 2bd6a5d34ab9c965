"""User-facing errors: each prints as one line naming the bad value and what was expected."""
import importlib


class BidirLMError(ValueError):
    """A user mistake (bad path, value or config). The CLI prints it as one line and exits 2."""


class MissingExtraError(BidirLMError, ImportError):
    """An optional dependency group is not installed."""

    def __init__(self, package: str, extra: str, purpose: str):
        super().__init__(
            f"{purpose} needs the package '{package}', which is not installed; "
            f"install it with: pip install 'bidirlm-pl[{extra}]'"
        )


def first_line(err: BaseException, limit: int | None = None) -> str:
    """The first line of an exception's text (its type name when empty), for one-line errors."""
    text = str(err).strip()
    line = text.splitlines()[0] if text else type(err).__name__
    return line[:limit] if limit else line


def require(module: str, extra: str, purpose: str):
    """Import an optional module or raise a one-line MissingExtraError."""

    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise MissingExtraError(module.split(".")[0], extra, purpose) from err


PREEMPTED_EXIT = 75  # EX_TEMPFAIL: the job stopped on a scheduler's signal; rerun it to resume


class Preempted(Exception):
    """A fit stopped on SIGTERM/SIGUSR1 after saving its checkpoint (``bidirlm`` exits with status 75)."""

    def __init__(self, step: int, path: str):
        super().__init__(f"preempted at step {step}: checkpoint {path}; rerun the same command to resume")
        self.step, self.path = step, path
