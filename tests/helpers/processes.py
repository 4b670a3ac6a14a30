"""Child processes that cannot hang a test run: each starts a session of its own and has a
hard time bound. Past the bound the test fails, naming the bound and the command, with the
tail of the child's stderr (where children registered `faulthandler` on SIGUSR1, their
stacks: it is sent before the kill); however the test ends, every process still in the child's
session (its workers, DDP ranks, Ray's daemons, grandchildren that made a process group of
their own) is killed, so nothing is left behind."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest


def session_members(session: int) -> list[int]:
    """Pids of the live processes in a session (Linux /proc)."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:  # it ended while we looked
            continue
        fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) "
        if fields[0] != "Z" and int(fields[3]) == session:
            members.append(int(entry.name))
    return members


def kill_session(session: int, within: float = 10.0) -> None:
    """SIGKILL every process of the session until none is left."""
    deadline = time.monotonic() + within
    while members := session_members(session):
        for pid in members:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        assert time.monotonic() < deadline, f"processes {members} of session {session} survive SIGKILL"
        time.sleep(0.05)


class Bounded:
    """A child process with a deadline; use it as a context manager."""

    def __init__(self, command: list[str], seconds: float, **popen: object) -> None:
        self.command, self.seconds = command, seconds
        self.deadline = time.monotonic() + seconds
        self.process = subprocess.Popen(
            command, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True, **popen,  # type: ignore[call-overload]
        )

    def __enter__(self) -> Bounded:
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()

    def kill(self) -> None:
        kill_session(self.process.pid)
        self.process.wait()

    def check_time(self) -> None:
        """Fail the test if the bound has passed (for loops that wait on the child)."""
        if time.monotonic() > self.deadline:
            self._fail()

    def communicate(self) -> tuple[str, str]:
        """The child's (stdout, stderr) once it ends, within the bound."""
        try:
            return self.process.communicate(timeout=max(self.deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            self._fail()
            raise  # not reached: pytest.fail raises

    def _fail(self) -> None:
        # children that registered faulthandler on SIGUSR1 print where they are stuck
        for pid in session_members(self.process.pid):
            try:
                os.kill(pid, signal.SIGUSR1)
            except ProcessLookupError:
                pass
        time.sleep(2)
        self.kill()
        stderr = self.process.communicate()[1]
        name = " ".join(os.path.basename(part) for part in self.command[:4])
        pytest.fail(
            f"{name} ... ran past its bound of {self.seconds:.0f} s and was killed with its whole "
            f"session; last stderr:\n{stderr[-3000:]}",
            pytrace=False,
        )


def run_bounded(command: list[str], seconds: float, **popen: object) -> subprocess.CompletedProcess:
    """`subprocess.run(command, capture_output=True, text=True)` within a hard bound."""
    with Bounded(command, seconds, **popen) as child:
        stdout, stderr = child.communicate()
        return subprocess.CompletedProcess(command, child.process.returncode, stdout, stderr)
