"""One job per output folder: a second one is refused at once, naming the folder and the
holder, and the lock dies with its process, however it ends (no stale lock after SIGKILL)."""

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from fedmpi import prepare
from fedmpi.config import Config
from fedmpi.errors import UsageError

HOLD = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from fedmpi.prepare import _lock_output
    _lock_output(Path(sys.argv[1]))
    print("locked", flush=True)
    time.sleep(600)
    """
)


def test_the_lock_refuses_a_second_job_and_dies_with_its_holder(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(out)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(UsageError) as refused:
            prepare._check_output(out, Config(output=str(out)))
        assert f"output directory {out} is in use by another fedmpi job" in str(refused.value)
        assert f"pid {holder.pid} on " in str(refused.value)  # who holds it
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
    assert not prepare._check_output(out, Config(output=str(out)))  # released by the kernel
    prepare._locked.pop(out.resolve()).close()


def test_the_same_process_may_reenter_its_own_folder(tmp_path):
    """fedmpi called in-process twice on one folder (a notebook, the bad-input test) is one
    job: its own lock does not refuse it."""
    out: Path = tmp_path / "out"
    for _ in range(2):
        prepare._check_output(out, Config(output=str(out)))
    prepare._locked.pop(out.resolve()).close()
