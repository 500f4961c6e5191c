"""The one exception type that means "the user can fix this" (CLI exit code 2)."""


import os
import sys


def _other_rank() -> bool:
    """Under a launcher, the ranks other than 0 (by the launcher's RANK) say nothing: they would repeat every
    line rank 0 prints."""
    return os.environ.get("RANK", "0") not in ("0", "")


def warn(message: str) -> None:
    """A one-line warning on stderr that does not break a tqdm bar."""
    if _other_rank():
        return
    from tqdm import tqdm

    tqdm.write(f"warning: {message}", file=sys.stderr)


def note(message: str) -> None:
    """A one-line notice on stderr (not a warning: something the user should know was done)."""
    if _other_rank():
        return
    from tqdm import tqdm

    tqdm.write(message, file=sys.stderr)


def via_make() -> bool:
    """Whether make runs this command: the Makefile sets PIPELINE_VIA_MAKE=1 on the commands it runs, so that
    messages name its variables (RESUME=1) rather than options the user never typed (--resume)."""
    return os.environ.get("PIPELINE_VIA_MAKE") == "1"


# The Makefile's variable for each command-line option it passes on
MAKE_VARIABLES = {"--config": "CONFIG", "--dtype": "DTYPE", "--resume": "RESUME", "--restart": "RESTART"}


def option(name: str, value: str | None = None) -> str:
    """An option as the user gives it: `--resume`, `--dtype fp32` on the command line; `RESUME=1`,
    `DTYPE=fp32` under make."""
    if via_make():
        return f"{MAKE_VARIABLES[name]}={1 if value is None else value}"
    return name if value is None else f"{name} {value}"


class UserError(Exception):
    """A problem with the user's config, files or cache; the message is one line and says what to do."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C at a point where the usual message would be wrong (e.g. after the LoRA was written): the CLI
    prints this message instead."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message
