"""Daemon start-up time and idle memory (not a test; figures for the issue note).

Starts `garrison serve` on a fresh state folder N times and measures the time from
exec to READY=1 on a real notify socket and to the first 200 from /health, and the
daemon's RSS once idle. Writes bench/out/daemon_startup.json and a markdown table.

    .venv/bin/python bench/daemon_startup.py [--runs 5]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

OUT = Path(__file__).resolve().parent / "out"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def one_run() -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        notify = Path(tmp) / "notify.sock"
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(str(notify))
        port = free_port()
        env = {**os.environ, "GARRISON_STATE_DIR": f"{tmp}/state", "GARRISON_CONFIG": "/dev/null",
               "NOTIFY_SOCKET": str(notify)}
        started = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-m", "garrison.cli", "serve", "--listen", f"127.0.0.1:{port}"],
                                env=env, stderr=subprocess.DEVNULL)
        try:
            sock.settimeout(30)
            while b"READY=1" not in sock.recv(4096):
                pass
            ready = time.perf_counter() - started
            while True:
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1):
                        break
                except OSError:
                    time.sleep(0.005)
            healthy = time.perf_counter() - started
            time.sleep(2.0)
            rss_kib = int(next(line for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines()
                               if line.startswith("VmRSS:")).split()[1])
        finally:
            proc.terminate()
            proc.wait(timeout=30)
            sock.close()
    return {"ready_s": ready, "healthy_s": healthy, "idle_rss_mib": rss_kib / 1024}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    runs = [one_run() for _ in range(args.runs)]
    summary = {key: statistics.median(r[key] for r in runs) for key in runs[0]}
    OUT.mkdir(exist_ok=True)
    (OUT / "daemon_startup.json").write_text(json.dumps({"runs": runs, "median": summary}, indent=2))
    table = [f"| measure (median of {args.runs}) | value |", "|---|---|",
             f"| exec -> READY=1 | {summary['ready_s'] * 1000:.0f} ms |",
             f"| exec -> first /health 200 | {summary['healthy_s'] * 1000:.0f} ms |",
             f"| idle RSS | {summary['idle_rss_mib']:.1f} MiB |"]
    (OUT / "daemon_startup.md").write_text("\n".join(table) + "\n")
    print("\n".join(table))


if __name__ == "__main__":
    main()
