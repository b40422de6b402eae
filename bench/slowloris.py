"""Slowloris at full scale against a real daemon (not a test; figures for the issue note).

N connections (1,100; 5,000 with the unit's LimitNOFILE) each send a request head a few bytes at a
time and never finish it; whenever the daemon drops one, the attacker opens another, so N stay open
or trying for the whole run. Meanwhile /health is polled once a second on a new connection from
another process, the daemon's RSS is sampled every second and its log lines are counted per second.
The daemon runs with its defaults (max_connections 4096, header_timeout_s 15) and raises its own
soft file limit to the hard one, as under systemd. tests/daemon/test_connections.py is the
scaled-down version that runs in the suite.

    .venv/bin/python bench/slowloris.py --connections 1100 --seconds 60
    .venv/bin/python bench/slowloris.py --connections 5000 --seconds 60

Writes bench/out/slowloris-N.json and a markdown table (bench/out/slowloris-N.md).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import multiprocessing
import os
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

OUT = Path(__file__).resolve().parent / "out"
HEAD = b"GET /v1/models HTTP/1.1\r\nHost: garrison\r\nX-Slow: "


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def raise_own_file_limit(needed: int) -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if hard < needed:
        sys.exit(f"RLIMIT_NOFILE hard limit {hard} < {needed}: raise it (ulimit -Hn, or LimitNOFILE)")
    return hard


def attacker(port: int, connections: int, seconds: float, counts: Any) -> None:
    """In its own process: keep `connections` slow senders open or connecting for `seconds`."""
    async def one(stop_at: float) -> None:
        while time.monotonic() < stop_at:
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
            except OSError:
                counts["connect_failed"] += 1
                await asyncio.sleep(0.5)
                continue
            counts["opened"] += 1
            try:
                writer.write(HEAD)
                while time.monotonic() < stop_at:
                    await asyncio.sleep(1.0)
                    writer.write(b"x")  # one byte a second, never the blank line that ends the head
                    await writer.drain()
                    if reader.at_eof():
                        break
            except OSError:
                pass
            counts["dropped"] += 1
            writer.close()

    async def main() -> None:
        stop_at = time.monotonic() + seconds
        tasks = []
        for _ in range(connections):  # ramp up over about two seconds, not one SYN burst
            tasks.append(asyncio.create_task(one(stop_at)))
            await asyncio.sleep(2.0 / connections)
        await asyncio.gather(*tasks, return_exceptions=True)

    asyncio.run(main())


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def run(connections: int, seconds: float) -> dict[str, Any]:
    raise_own_file_limit(connections + 256)
    with tempfile.TemporaryDirectory() as tmp:
        port = free_port()
        log_path = Path(tmp) / "daemon.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith("GARRISON_")}
        env.update({"GARRISON_STATE_DIR": f"{tmp}/state", "GARRISON_CONFIG": "/dev/null",
                    "XDG_CONFIG_HOME": f"{tmp}/xdg", "GARRISON_RUN_JOBS": "false"})
        with log_path.open("wb") as log:
            daemon = subprocess.Popen([sys.executable, "-m", "garrison.cli", "serve", "--listen",
                                       f"127.0.0.1:{port}"], env=env, stdout=log, stderr=log)
        try:
            for _ in range(200):
                try:
                    urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1).read()
                    break
                except OSError:
                    time.sleep(0.05)
            time.sleep(1.0)
            rss_before = rss_mib(daemon.pid)
            lines_before = len(log_path.read_bytes().splitlines())
            manager = multiprocessing.Manager()
            counts = manager.dict({"opened": 0, "dropped": 0, "connect_failed": 0})
            attack = multiprocessing.Process(target=attacker, args=(port, connections, seconds, counts))
            attack.start()
            probes: list[float | None] = []
            rss: list[float] = []
            fds: list[int] = []
            started = time.monotonic()
            while time.monotonic() - started < seconds:
                tick = time.monotonic()
                try:
                    urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5).read()
                    probes.append(time.monotonic() - tick)
                except OSError:
                    probes.append(None)  # no answer within 5 s
                rss.append(rss_mib(daemon.pid))
                fds.append(open_fds(daemon.pid))
                time.sleep(max(0.0, 1.0 - (time.monotonic() - tick)))
            attack.join(timeout=30)
            alive = daemon.poll() is None
            after = urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5).status if alive else None
            lines = log_path.read_bytes().splitlines()[lines_before:]
            opened, dropped, failed = counts["opened"], counts["dropped"], counts["connect_failed"]
            manager.shutdown()
        finally:
            daemon.terminate()
            daemon.wait(timeout=30)
    per_second = collections.Counter(line[:19] for line in lines)  # the ISO timestamp to the second
    answered = [p for p in probes if p is not None]
    return {
        "connections": connections, "seconds": seconds,
        "probes": len(probes), "probes_unanswered": len(probes) - len(answered),
        "probes_over_1s": sum(1 for p in answered if p > 1.0) + len(probes) - len(answered),
        "probe_ms_median": round(statistics.median(answered) * 1000, 1) if answered else None,
        "probe_ms_p99": round(sorted(answered)[int(0.99 * (len(answered) - 1))] * 1000, 1) if answered else None,
        "probe_ms_max": round(max(answered) * 1000, 1) if answered else None,
        "log_lines": len(lines), "log_lines_max_per_s": max(per_second.values(), default=0),
        "log_events": dict(collections.Counter(
            part.split(b"=", 1)[1].decode() for line in lines for part in line.split() if part.startswith(b"event="))),
        "rss_mib_before": round(rss_before, 1), "rss_mib_max": round(max(rss), 1), "rss_mib_end": round(rss[-1], 1),
        "daemon_fds_max": max(fds),
        "attacker_connections_opened": opened, "attacker_connections_dropped": dropped,
        "attacker_connect_failures": failed,
        "daemon_alive": alive, "health_after": after,
    }


def markdown(result: dict[str, Any]) -> str:
    rows = [("slow connections held", f"{result['connections']} for {result['seconds']:g} s"),
            ("/health probes answered within 1 s",
             f"{result['probes'] - result['probes_over_1s']} / {result['probes']}"),
            ("/health latency median / p99 / max",
             f"{result['probe_ms_median']} / {result['probe_ms_p99']} / {result['probe_ms_max']} ms"),
            ("daemon log lines (max in one second)", f"{result['log_lines']} ({result['log_lines_max_per_s']})"),
            ("daemon RSS before / max / end",
             f"{result['rss_mib_before']} / {result['rss_mib_max']} / {result['rss_mib_end']} MiB"),
            ("daemon open fds (max)", str(result["daemon_fds_max"])),
            ("attacker connections opened / dropped by the daemon",
             f"{result['attacker_connections_opened']} / {result['attacker_connections_dropped']}"),
            ("daemon alive, /health after", f"{result['daemon_alive']}, {result['health_after']}")]
    return "\n".join(["| measure | value |", "|---|---|", *(f"| {a} | {b} |" for a, b in rows)]) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", type=int, default=1100)
    parser.add_argument("--seconds", type=float, default=60.0)
    args = parser.parse_args()
    result = run(args.connections, args.seconds)
    OUT.mkdir(exist_ok=True)
    stem = OUT / f"slowloris-{args.connections}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    table = markdown(result)
    stem.with_suffix(".md").write_text(table)
    print(table)
    print(json.dumps(result["log_events"]))


if __name__ == "__main__":
    main()
