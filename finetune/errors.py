"""The one exception type that means "the user's input is wrong" (exit code 2)."""

from __future__ import annotations


class UserError(Exception):
    """Bad input: a recipe key, a path, a checkpoint or a dataset the user can fix.

    The CLI prints the message without a traceback and exits with code 2. ``problems`` holds one
    line per problem when several were found at once (for example every invalid recipe key).
    """

    def __init__(self, message: str, problems: list[str] | None = None) -> None:
        super().__init__(message)
        self.problems = problems or []

    def __str__(self) -> str:
        head = super().__str__()
        if not self.problems:
            return head
        return head + "\n" + "\n".join(f"  - {line}" for line in self.problems)
