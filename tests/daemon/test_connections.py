"""Slow and excess connections (slowloris, scaled down): probes keep answering, slow senders are dropped."""

from __future__ import annotations

import socket
import threading
import time
import urllib.request
from typing import Any

from conftest import Daemon


def test_slow_connections_are_dropped_and_probes_keep_answering(make_daemon: Any) -> None:
    daemon: Daemon = make_daemon(GARRISON_MAX_CONNECTIONS="16", GARRISON_HEADER_TIMEOUT_S="1").start()
    slow: list[socket.socket] = []
    stop = threading.Event()

    def trickle() -> None:  # 120 connections, each sending a request head one byte at a time, never ending
        for _ in range(120):
            try:
                s = socket.create_connection(("127.0.0.1", daemon.port), timeout=2)
                s.sendall(b"GET /v1/models HTTP/1.1\r\nHost: x\r\n")
                slow.append(s)
            except OSError:
                pass
        while not stop.is_set():
            for s in list(slow):
                try:
                    s.sendall(b"X")
                except OSError:
                    slow.remove(s)
            time.sleep(0.2)

    attacker = threading.Thread(target=trickle)
    attacker.start()
    latencies: list[float] = []
    try:
        time.sleep(0.3)
        for _ in range(15):  # /health every 0.2 s for 3 s, on new connections, during the flood
            started = time.monotonic()
            with urllib.request.urlopen(daemon.url + "/health", timeout=5) as r:
                assert r.status == 200
            latencies.append(time.monotonic() - started)
            time.sleep(0.2)
        dropped = sum(1 for s in list(slow) if _closed(s))
    finally:
        stop.set()
        attacker.join()
        for s in slow:
            s.close()
    assert max(latencies) < 1.0, latencies
    assert dropped >= 1 or not slow  # the slow senders were cut off (header_timeout_s = 1)
    log = daemon.log()
    assert log.count("event=connections.") <= 3  # counted, once per 10 s at most, never one line each
    assert "Traceback" not in log
    status, _ = daemon.request("GET", "/v1/models", role="infer")
    assert status == 200  # normal service after the flood


def _closed(s: socket.socket) -> bool:
    s.settimeout(0.5)
    try:
        return s.recv(1) == b""
    except (ConnectionResetError, BrokenPipeError):
        return True
    except OSError:
        return False
