"""The exceptions that end a run with an exit code of their own (``finetune.cli`` maps them):
bad input 2, divergence 3, a signal 128 + its number (130 for Ctrl-C, 143 for SIGTERM)."""

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


def at_most(lines: list[str], limit: int) -> list[str]:
    """The first ``limit`` lines, and one saying how many were left out, if any."""
    if len(lines) <= limit:
        return lines
    return [*lines[:limit], f"... and {len(lines) - limit} more"]


class TrainingDiverged(Exception):
    """The loss or the gradient norm stopped being finite (exit code 3). The last good
    checkpoint is kept; nothing after it was saved."""

    exit_code = 3

    def __init__(self, *, step: int, loss: float, epoch: int | None = None) -> None:
        super().__init__(step, loss, epoch)
        self.step, self.loss, self.epoch = step, loss, epoch

    def __str__(self) -> str:
        where = f"epoch {self.epoch}, step {self.step}" if self.epoch else f"step {self.step}"
        return (
            f"training diverged at {where} (loss {self.loss}, or a non-finite gradient "
            "norm); the last good checkpoint is kept. Lower optimizer.lr, set "
            "train.clip_grad_norm, or add warmup (scheduler.warmup_epochs)"
        )


class Interrupted(Exception):
    """A signal stopped the run after a checkpoint (exit code 128 + the signal's number)."""

    def __init__(self, signum: int, where: str) -> None:
        super().__init__(signum, where)
        self.signum, self.where = signum, where
        self.exit_code = 128 + signum

    def __str__(self) -> str:
        import signal

        return f"interrupted by {signal.Signals(self.signum).name}: checkpoint at {self.where}"
