"""One process for the session's vLLM engines (tests/vllm_jobs.py), started early or on the first job:
importing vLLM takes longer than building a tiny engine, so the jobs share the import and each builds its
own engine."""
from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

SERVER = Path(__file__).with_name("vllm_jobs.py")
# tiny-bd3-L4 with the engine in its own processes (max_model_len 128, seed 0), kept up between jobs: its start
# spawns a process that imports vLLM again, the slow part, and two test modules use the same engine.
L4_OWN_PROCESSES = "tiny-bd3-L4, engine in its own processes"


class EngineProcess:
    def __init__(self, log_path: Path) -> None:
        self.log_path, self.proc = log_path, None

    def start(self) -> "EngineProcess":
        """Start the process and wait until it has imported vLLM."""
        self._start()
        return self

    def _start(self) -> None:
        self.log = self.log_path.open("a")
        self.proc = subprocess.Popen([sys.executable, str(SERVER)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.log, text=True, start_new_session=True,
                                     env=os.environ | {"VLLM_CPU_KVCACHE_SPACE": "1"})
        self.answers: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, args=(self.proc, self.answers), daemon=True).start()
        self._answer("start", timeout=600)  # {"ready": true} once vLLM is imported

    @staticmethod
    def _read(proc, answers) -> None:
        for line in proc.stdout:
            answers.put(json.loads(line))
        answers.put(None)  # the process ended

    def _log_tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:]

    def run(self, kind: str, spec: dict, env: dict | None = None, timeout: float = 900):
        """`run(spec)` of the job's module (tests/vllm_jobs.py), with `env` set; its return value."""
        if self.proc is None or self.proc.poll() is not None:
            self._start()
        self.proc.stdin.write(json.dumps({"kind": kind, "spec": spec, "env": env or {}}) + "\n")
        self.proc.stdin.flush()
        answer = self._answer(kind, timeout)
        assert "error" not in answer, f"engine job {kind} failed:\n{answer['error']}\n{self._log_tail()}"
        return answer["result"]

    def _answer(self, what: str, timeout: float) -> dict:
        try:
            answer = self.answers.get(timeout=timeout)
        except queue.Empty:
            self.close()
            pytest.fail(f"engine process: {what} did not answer in {timeout} s\n{self._log_tail()}")
        if answer is None:
            self.close()
            pytest.fail(f"the engine process ended during {what}\n{self._log_tail()}")
        return answer

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.stdin.close()  # the server's loop ends at the end of its input
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:  # a job still running: end it and its engine processes
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        if self.proc is not None:
            self.log.close()
        self.proc = None
