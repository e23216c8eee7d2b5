"""`dca serve` as a process: SIGTERM lets the request in flight finish, then the process exits cleanly."""

import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_healthy(port: int, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()[0]
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            conn.request("GET", "/health")
            if conn.getresponse().status == 200:
                return
        except OSError:
            time.sleep(0.2)
    pytest.fail("the server did not come up")


@pytest.mark.skipif(sys.platform == "win32", reason="SIGTERM")
def test_sigterm_finishes_the_request_in_flight_then_exits(served_dirs, tmp_path):
    model_dir, coprocessor = served_dirs
    # a long context, so that the request is surely still running when the signal comes (~3 ms a token)
    shutil.copytree(model_dir, tmp_path / "model")
    config = json.loads((tmp_path / "model" / "config.json").read_text())
    (tmp_path / "model" / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 2048}))
    model_dir = str(tmp_path / "model")
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    process = subprocess.Popen([sys.executable, "-m", "dca", "serve", "--model", model_dir, "--coprocessor",
                                coprocessor, "--port", str(port), "--device", "cpu"],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        wait_healthy(port, process)
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        conn.request("POST", "/v1/completions", body=json.dumps(
            {"prompt": "the cat sees", "max_tokens": 1500, "temperature": 0, "stream": True}),
            headers={"Content-Type": "application/json"})
        answer = conn.getresponse()
        assert answer.status == 200 and answer.read(6) == b"data: "
        process.send_signal(signal.SIGTERM)  # mid-stream
        rest = []
        reader = threading.Thread(target=lambda: rest.append(answer.read().decode()))
        reader.start()
        reader.join(120)
        events = [json.loads(line[6:]) for line in ("data: " + rest[0]).split("\n\n") if line.startswith("data: {")]
        assert ("data: " + rest[0]).endswith("data: [DONE]\n\n")
        assert events[-1]["choices"][0]["finish_reason"] == "length"  # all 1500 tokens (the toy model loops)
        # uvicorn re-raises the signal once it has shut down gracefully, so the parent sees a SIGTERM exit
        assert process.wait(60) in (0, -signal.SIGTERM)
    finally:
        if process.poll() is None:
            process.kill()
    log = process.communicate()[0]
    print(log)
    assert "Waiting for connections to close" in log and "Finished server process" in log, log
