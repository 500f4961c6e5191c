"""The one exception type that means "the user can fix this" (CLI exit code 2)."""


import sys

# Under a launcher, the ranks other than 0 set this (pipeline.dist): they would repeat every line rank 0 prints.
silent = False


def warn(message: str) -> None:
    """A one-line warning on stderr that does not break a tqdm bar."""
    if silent:
        return
    from tqdm import tqdm

    tqdm.write(f"warning: {message}", file=sys.stderr)


def note(message: str) -> None:
    """A one-line notice on stderr (not a warning: something the user should know was done)."""
    if silent:
        return
    from tqdm import tqdm

    tqdm.write(message, file=sys.stderr)


class UserError(Exception):
    """A problem with the user's config, files or cache; the message is one line and says what to do."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C at a point where the usual message would be wrong (e.g. after the LoRA was written): the CLI
    prints this message instead."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message
