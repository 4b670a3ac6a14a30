"""helpers.processes: a child past its bound fails the test with the reason and the
child's stack, and nothing of its session is left, not even a grandchild that left its
process group."""

import sys

import pytest
from helpers.processes import Bounded, session_members

HANGS = """
import faulthandler, signal, subprocess, sys, time
faulthandler.register(signal.SIGUSR1)
subprocess.Popen([sys.executable, "-c", "import os, time; os.setpgrp(); time.sleep(600)"])
print("waiting", file=sys.stderr, flush=True)
time.sleep(600)
"""


def test_a_child_past_its_bound_fails_with_its_stack_and_leaves_nothing():
    child = Bounded([sys.executable, "-c", HANGS], 8)
    with pytest.raises(pytest.fail.Exception) as failed:
        child.communicate()
    message = str(failed.value)
    assert "ran past its bound of 8 s and was killed with its whole session" in message
    assert "waiting" in message and 'File "<string>", line 6' in message  # stderr, then the stack
    assert session_members(child.process.pid) == []


def test_a_child_within_its_bound_gives_its_output():
    with Bounded([sys.executable, "-c", "print('out'); import sys; sys.exit(3)"], 60) as child:
        assert child.communicate()[0] == "out\n"
    assert child.process.returncode == 3
