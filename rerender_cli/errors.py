"""The one exception the programs share, so that no program imports another for it."""


class UserError(Exception):
    """A problem the user can fix; printed as one line with its exit code."""

    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code
