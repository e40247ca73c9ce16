"""Start train.py as a background process, watch its output, and signal it at a known point."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

from train_helpers import REPO, TINY


class RunningTrain:
    """train.py (or torchrun train.py) in its own session; stdout+stderr collected line by line."""

    def __init__(self, args, *, data_root, root, hook=None, launcher=(sys.executable,), env=None):
        full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0", **(env or {})}
        full_env.pop("SFA_WORKSPACE", None)
        if hook:
            full_env["SFA_TEST_HOOK"] = hook
        self.cmd = [*launcher, str(REPO / "train.py"), *TINY, f"data.root={data_root}", f"root={root}", *args]
        self.proc = subprocess.Popen(self.cmd, cwd=REPO, env=full_env, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, start_new_session=True)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self):
        for line in self.proc.stdout:
            self.lines.append(line)

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def wait_for(self, text: str, timeout: float = 120) -> None:
        """Block until `text` appears in the output; fail (with the output) if the process ends first."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if text in self.output:
                return
            if self.proc.poll() is not None:
                self._reader.join(5)
                if text in self.output:
                    return
                raise AssertionError(f"train.py ended (rc {self.proc.returncode}) before {text!r}:\n{self.output[-6000:]}")
            time.sleep(0.02)
        self.kill_group()
        raise AssertionError(f"no {text!r} within {timeout}s:\n{self.output[-6000:]}")

    def signal(self, sig: int) -> None:
        os.kill(self.proc.pid, sig)

    def kill_group(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def finish(self, timeout: float = 120) -> int:
        """Wait for the exit (killing the whole group on timeout); returns the exit code."""
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill_group()
            self.proc.wait()
            raise AssertionError(f"train.py still running after {timeout}s:\n{self.output[-6000:]}") from None
        finally:
            self._reader.join(10)
        return self.proc.returncode
