"""Main-process side of the DeepSparse worker: starts deepsparse_worker.py with the DeepSparse venv's python.

The worker blocks on its stdin between requests, so while another engine is being timed it uses no CPU; each
`time` request makes it run its engine alone and report the per-call times it measured itself.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np


HERE = Path(__file__).resolve().parent
DEFAULT_VENV = HERE.parent / ".venv-deepsparse"
SETUP_HINT = "run benchmarks/speed/setup_deepsparse.sh (creates benchmarks/.venv-deepsparse with deepsparse==1.8.0)"


class DeepSparseUnavailable(RuntimeError):
    pass


def venv_python(venv: Path | None = None) -> Path:
    venv = Path(venv or os.environ.get("HF_SPARSE_DEEPSPARSE_VENV", DEFAULT_VENV))
    python = venv / "bin" / "python"
    if not python.is_file():
        raise DeepSparseUnavailable(f"DeepSparse venv not found: {python} does not exist; {SETUP_HINT}")
    return python


class DeepSparseClient:
    """One worker process for the whole run; engines are compiled in it under string keys."""

    def __init__(self, log_path: Path, venv: Path | None = None):
        python = venv_python(venv)
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self.log_path = log_path
        # the worker's stderr (DeepSparse banners and errors), held open for the life of the worker
        self._log = open(log_path, "ab")  # noqa: SIM115
        env = {**os.environ, "NM_DISABLE_ANALYTICS": "1", "PYTHONUNBUFFERED": "1"}
        self._proc = subprocess.Popen(
            [str(python), str(HERE / "deepsparse_worker.py")],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            env=env,
            text=True,
            bufsize=1,
        )
        try:
            self.info = self.request("hello")
        except Exception:
            self.close()
            raise

    def request(self, op: str, **kwargs) -> dict:
        if self._proc.poll() is not None:
            raise DeepSparseUnavailable(f"DeepSparse worker exited with code {self._proc.returncode}; {self._tail()}")
        self._proc.stdin.write(json.dumps({"op": op, **kwargs}) + "\n")
        self._proc.stdin.flush()
        line = self._proc.stdout.readline()
        if not line:
            code = self._proc.wait(timeout=10)
            raise DeepSparseUnavailable(f"DeepSparse worker died during {op!r} (exit code {code}); {self._tail()}")
        reply = json.loads(line)
        if not reply.pop("ok", False):
            raise RuntimeError(
                f"DeepSparse worker failed on {op!r}: {reply.get('error')}\n{reply.get('traceback', '')}".rstrip()
            )
        return reply

    def _tail(self) -> str:
        self._log.flush()
        text = self.log_path.read_text(errors="replace").strip().splitlines()[-15:]
        return f"worker log {self.log_path}:\n" + "\n".join(text)

    def load(self, key: str, onnx_path: Path, batch: int, inputs: dict[str, np.ndarray], cores: int) -> dict:
        inputs_path = onnx_path.parent / f"inputs_b{batch}.npz"
        if not inputs_path.is_file():
            tmp = inputs_path.with_name(f".{inputs_path.name}.{os.getpid()}.tmp.npz")
            np.savez(tmp, **inputs)
            os.replace(tmp, inputs_path)
        return self.request("load", key=key, path=str(onnx_path), batch=batch, inputs=str(inputs_path), cores=cores)

    def close(self) -> None:
        if self._proc.poll() is None:
            try:
                self._proc.stdin.write(json.dumps({"op": "quit"}) + "\n")
                self._proc.stdin.flush()
                self._proc.wait(timeout=30)
            except (OSError, subprocess.TimeoutExpired):
                self._proc.kill()
                self._proc.wait()
        self._log.close()


_CLIENT: DeepSparseClient | None = None


def get_client(cache_root: Path) -> DeepSparseClient:
    """The run's worker, started on first use."""
    global _CLIENT
    if _CLIENT is None:
        _CLIENT = DeepSparseClient(cache_root / "deepsparse_worker.log")
    return _CLIENT


def close_client() -> None:
    global _CLIENT
    if _CLIENT is not None:
        _CLIENT.close()
        _CLIENT = None


if __name__ == "__main__":  # quick check of the venv: python deepsparse_client.py
    client = DeepSparseClient(Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/deepsparse_worker.log"))
    print(client.info)
    client.close()
