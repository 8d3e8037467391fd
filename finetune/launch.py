"""``finetune run RECIPE --nproc N``: one command that starts N training processes under torchrun
and stops them together.

Three kinds of process take part. The launcher is the ``finetune`` process the user started (and
signals); it runs torchrun in a session of its own, so a Ctrl-C in the terminal reaches only the
launcher. Torchrun (``python -m finetune.launch``, torchrun's own code run in-process) starts the
workers, each in a session of its own too. The workers run ``finetune run`` (``worker_process``).

- **Signals.** SIGINT and SIGTERM to the launcher are passed to every worker (each writes its pid
  to the launch folder at start-up), not to torchrun, which would pass on a second one (and a
  second signal stops a worker at once, without a checkpoint). The workers agree on the step,
  rank 0 checkpoints, all exit 130 / 143. Whatever still runs ``STOP_GRACE_S`` later is killed.
- **No orphans.** Torchrun gets SIGKILL when the launcher dies (``PR_SET_PDEATHSIG``, Linux) and
  each worker when torchrun dies; when torchrun ends, what is left of its session and of the
  workers' is killed.
- **One exit code, one message.** Each worker records its exit code and the error it would have
  printed in the launch folder; the launcher prints one and exits with that code (2 bad input,
  3 divergence, 130 / 143 a signal), not torchrun's 1, and torchrun's report on failed workers is
  left out for those codes.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

LAUNCH_DIR_ENV = "FINETUNE_LAUNCH_DIR"  # the folder where workers leave their pids and exit codes
TORCHRUN_PID_ENV = "FINETUNE_TORCHRUN_PID"
STOP_GRACE_S = 60.0  # after a signal: time for the workers to checkpoint before they are killed
EXPECTED_EXITS = {2, 3, 128 + signal.SIGINT, 128 + signal.SIGTERM}  # finetune's own exit codes
_POLL_S = 0.1


def is_torchrun_child() -> bool:
    """True in a process torchrun started (it sets ``LOCAL_RANK`` and ``WORLD_SIZE``)."""
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def launch_torchrun(nproc: int, argv: list[str]) -> int:
    """Run ``python -m finetune ARGV`` in ``nproc`` processes under torchrun; the workers' exit
    code (0, 2, 3, 130, 143; torchrun's own for anything else), after printing their message."""
    with tempfile.TemporaryDirectory(prefix="finetune-launch-") as folder:
        launch = _Launch(Path(folder))
        command = [
            sys.executable,
            "-m",
            "finetune.launch",
            "--standalone",
            f"--nproc-per-node={nproc}",
            "-m",
            "finetune",
            *argv,
        ]
        with launch.forwarding_signals():
            torchrun = subprocess.Popen(
                command,
                env={**os.environ, LAUNCH_DIR_ENV: folder},
                start_new_session=True,  # its own process group: no terminal Ctrl-C, one killpg
                preexec_fn=_dies_with(os.getpid()),
            )
            returncode = launch.wait(torchrun)
        return launch.report(returncode)


@dataclass
class _Exit:
    rank: int
    code: int
    message: str


class _Launch:
    """The launcher's side: signals forwarded to the workers, the wait, the report."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.signals: list[int] = []  # received, in order; each is sent to every worker once
        self.sent: dict[int, int] = {}  # worker pid -> how many of ``signals`` it has been sent
        self.deadline: float | None = None

    @contextlib.contextmanager
    def forwarding_signals(self) -> Iterator[None]:
        def received(signum: int, frame: object) -> None:
            self.signals.append(signum)
            if self.deadline is None:
                self.deadline = time.monotonic() + STOP_GRACE_S

        previous = {sig: signal.signal(sig, received) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, old in previous.items():
                signal.signal(sig, old)

    def wait(self, torchrun: subprocess.Popen) -> int:
        """Torchrun's exit code once it has ended, or after the grace time of a signal."""
        while not _has_ended(torchrun):
            self._forward()  # also to workers that registered after the signal came
            if self.deadline is not None and time.monotonic() > self.deadline:
                break
            time.sleep(_POLL_S)
        # Before torchrun is reaped its process group id cannot be reused: kill what is left.
        for group in [torchrun.pid, *self._worker_pids()] if hasattr(os, "killpg") else []:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(group, signal.SIGKILL)
        return torchrun.wait()

    def report(self, returncode: int) -> int:
        """Print the workers' message once; their exit code."""
        failed = [record for record in self._exits() if record.code != 0]
        if not failed and returncode != 0 and self.signals:  # stopped before any could record
            failed = [_Exit(rank=0, code=128 + self.signals[0], message="")]
        if not failed:
            return returncode
        first = min(failed, key=_cause_first)
        # An expected exit explains itself; for anything else, every distinct message helps.
        shown = [first] if first.code in EXPECTED_EXITS else sorted(failed, key=lambda r: r.rank)
        messages = [record.message.rstrip("\n") for record in shown if record.message.strip()]
        if not messages and first.code > 128:
            messages = [f"interrupted by {signal.Signals(first.code - 128).name}"]
        for message in dict.fromkeys(messages):
            print(message, file=sys.stderr)
        return first.code

    def _forward(self) -> None:
        for pid in self._worker_pids():
            while self.sent.get(pid, 0) < len(self.signals):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, self.signals[self.sent.get(pid, 0)])
                self.sent[pid] = self.sent.get(pid, 0) + 1

    def _worker_pids(self) -> list[int]:
        return [int(path.read_text()) for path in sorted(self.folder.glob("pid-*"))]

    def _exits(self) -> list[_Exit]:
        return [_Exit(**json.loads(path.read_text())) for path in self.folder.glob("exit-*")]


def _cause_first(record: _Exit) -> tuple[int, int]:
    """Bad input or divergence found by any rank first (the others then fail on their next
    collective or are stopped by torchrun), then a signal's code, then the rest; by rank."""
    kind = 0 if record.code in (2, 3) else 1 if record.code in EXPECTED_EXITS else 2
    return kind, record.rank


def _has_ended(process: subprocess.Popen) -> bool:
    """Whether ``process`` has ended, left unreaped (WNOWAIT) where the platform allows."""
    if not hasattr(os, "waitid"):  # macOS
        return process.poll() is not None
    return os.waitid(os.P_PID, process.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None


def _dies_with(parent: int) -> Callable[[], None] | None:
    """For ``preexec_fn``: the child gets SIGKILL when ``parent`` dies (Linux; None elsewhere)."""
    if sys.platform != "linux":
        return None
    import ctypes

    prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up before the fork
    pr_set_pdeathsig = 1

    def set_death_signal() -> None:
        prctl(pr_set_pdeathsig, int(signal.SIGKILL), 0, 0, 0)
        if os.getppid() != parent:  # it died before prctl: no signal will come
            os.kill(os.getpid(), signal.SIGKILL)

    return set_death_signal


@contextlib.contextmanager
def worker_process(errors: Any) -> Iterator[None]:
    """Around a worker's command (``finetune.cli.main`` under torchrun): when ``launch_torchrun``
    started it, die with torchrun, register the pid for signals, and hand the exit code and the
    error message (printed on ``errors``, a rich console) to the launcher instead of printing it
    once per process. Under a torchrun the user started, nothing changes."""
    folder = os.environ.get(LAUNCH_DIR_ENV)
    if folder is None or TORCHRUN_PID_ENV not in os.environ:
        yield
        return
    set_death_signal = _dies_with(int(os.environ[TORCHRUN_PID_ENV]))
    if set_death_signal is not None:
        set_death_signal()
    # Until training installs its own handler (and after it), SIGTERM ends the process with
    # 143, recorded, as SIGINT ends it with 130 through KeyboardInterrupt.
    signal.signal(signal.SIGTERM, _exit_on_signal)
    rank = int(os.environ.get("RANK", "0"))
    _write(Path(folder) / f"pid-{rank}", str(os.getpid()))  # the launcher may signal it now
    errors.file = message = io.StringIO()
    code = 1  # an exception other than SystemExit (--debug) ends Python with 1
    try:
        yield
        code = 0
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 0 if exit_.code is None else 1
        raise
    finally:
        _write(
            Path(folder) / f"exit-{rank}",
            json.dumps({"rank": rank, "code": code, "message": message.getvalue()}),
        )
        if rank != 0 and code in EXPECTED_EXITS - {2}:
            # All ranks stop at the same step; rank 0 may still be saving. Exiting non-zero
            # first would make torchrun stop rank 0 with a SIGTERM: a second signal for it.
            _wait_for_rank0(Path(folder))


def _exit_on_signal(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def _wait_for_rank0(folder: Path) -> None:
    deadline = time.monotonic() + STOP_GRACE_S
    while not (folder / "exit-0").exists() and time.monotonic() < deadline:
        time.sleep(_POLL_S)


def _write(path: Path, text: str) -> None:
    """Write whole or not at all: the launcher and the other ranks poll for these files."""
    partial = path.with_name(f".{path.name}.tmp")  # not matched by the readers' globs
    partial.write_text(text)
    os.replace(partial, path)


class _QuietTeardown(logging.Filter):
    """Drop torchrun's log lines about a worker that exited with one of finetune's own codes,
    and about the others being stopped after it (the launcher prints the worker's message)."""

    def filter(self, record: logging.LogRecord) -> bool:
        text = str(record.msg)
        if "closing signal" in text:
            return False
        code = record.args[0] if isinstance(record.args, tuple) and record.args else None
        return not (text.startswith("failed (exitcode") and code in EXPECTED_EXITS)


def _torchrun(argv: list[str]) -> int:
    """The torchrun process: ``torch.distributed.run`` with torchrun's arguments ``argv``."""
    os.environ[TORCHRUN_PID_ENV] = str(os.getpid())  # the workers' parent, for their death signal
    # The launcher signals the workers itself; torchrun passing SIGINT/SIGTERM on too would be
    # a second signal for them. It keeps its handlers for the other signals.
    os.environ["TORCHELASTIC_SIGNALS_TO_HANDLE"] = "SIGHUP,SIGQUIT"
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda signum, frame: None)  # a handler (unlike SIG_IGN) ends at exec
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    logging.getLogger("torch.distributed.elastic.multiprocessing.api").addFilter(_QuietTeardown())
    try:
        run(parse_args(argv))
    except ChildFailedError as error:
        _, root_cause = error.get_first_failure()  # the others failed or were stopped after it
        if root_cause.exitcode in EXPECTED_EXITS:
            return 1  # the launcher prints the workers' message and exits with their code
        raise
    return 0


if __name__ == "__main__":
    sys.exit(_torchrun(sys.argv[1:]))
