"""A TensorBoard server on 127.0.0.1 over a folder of event files, for the tests of initdoctor's tab."""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=10) as r:
        return r.read()


@contextlib.contextmanager
def serve(log_dir: Path, runs: int, timeout: float = 90.0) -> Iterator[str]:
    """The server's URL once the tab lists `runs` runs; the server is stopped on exit."""
    port = free_port()
    log_path = log_dir.parent / f"tensorboard-{port}.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "tensorboard.main", "--logdir", str(log_dir), "--host",
                                 "127.0.0.1", "--port", str(port), "--reload_interval", "0"],
                                stdout=log, stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + timeout
            while True:
                try:
                    if len(json.loads(get(f"{url}/data/plugin/initdoctor/runs"))["runs"]) == runs:
                        break
                except OSError:
                    pass
                if proc.poll() is not None or time.monotonic() > deadline:
                    log.flush()
                    raise RuntimeError("TensorBoard did not serve the runs:\n" + log_path.read_text())
                time.sleep(0.5)
            yield url
        finally:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
