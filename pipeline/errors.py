"""The one exception type that means "the user can fix this" (CLI exit code 2)."""


class UserError(Exception):
    """A problem with the user's config, files or cache; the message is one line and says what to do."""
