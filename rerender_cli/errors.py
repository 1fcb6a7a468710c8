"""The one exception and the exit codes the programs share, so that no program imports another for them."""

INTERRUPTED_EXIT = 130   # 128 + SIGINT: Ctrl-C


class UserError(Exception):
    """A problem the user can fix; printed as one line with its exit code."""

    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code
