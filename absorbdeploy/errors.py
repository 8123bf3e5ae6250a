"""The one exception type the CLI turns into a single line on stderr and exit code 2.

Raise `UserError` for anything the user can fix (bad path, bad recipe, bad value); its message is the whole story: what is
wrong and what to do. Everything else that escapes is a bug and keeps its traceback.
"""


class UserError(Exception):
    """Bad input or usage. The message is one line naming the problem and the fix."""

    def __init__(self, message: str):
        super().__init__(" ".join(message.split()))
