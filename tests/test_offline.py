"""No network: Garrison works in a true air gap (`unshare -n`) and refuses outbound
connections from its own processes before any packet is sent."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, garrison_env


def _can_unshare() -> bool:
    if os.geteuid() != 0 or not shutil.which("unshare") or not shutil.which("ip"):
        return False
    probe = subprocess.run(["unshare", "-n", "true"], capture_output=True)
    return probe.returncode == 0


needs_airgap = pytest.mark.skipif(not _can_unshare(), reason="needs root, unshare and ip (iproute2)")


def _airgapped(command: str, env: dict[str, str], timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["unshare", "-n", "sh", "-c", f"ip link set lo up && {command}"],
                          capture_output=True, text=True, env=env, cwd=REPO, timeout=timeout)


@needs_airgap
def test_daemon_and_jobs_pass_their_tests_in_an_air_gap() -> None:
    env = {k: v for k, v in os.environ.items() if k != "PYTEST_ADDOPTS"}
    proc = _airgapped(f"{sys.executable} -m pytest -q -p no:cacheprovider tests/daemon/test_jobs_api.py "
                      "tests/jobs/test_runner.py", env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout


@needs_airgap
def test_outbound_connection_from_a_worker_is_refused(state_dir: Path) -> None:
    env = garrison_env(state_dir)
    # 192.0.2.1 is TEST-NET-1 and the namespace has no route: even a broken guard sends nothing.
    proc = _airgapped(f"{sys.executable} -m garrison.cli jobs submit selftest --json -p steps=1 -p step_s=0 "
                      "-p probe_address=192.0.2.1:80", env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)["result"]
    assert result["network_probe"].startswith("refused by guard"), result


@needs_airgap
def test_guard_refuses_lookups_and_connections_but_allows_loopback() -> None:
    code = (
        "import socket\n"
        "from garrison.policies import network_guard\n"
        "network_guard.install()\n"
        "import os; assert os.environ['HF_HUB_OFFLINE'] == '1'\n"
        "for target in [('192.0.2.1', 80), ('example.com', 443), ('2001:db8::1', 80)]:\n"
        "    try:\n"
        "        socket.create_connection(target, timeout=1)\n"
        "    except PermissionError as exc:\n"
        "        print('refused', target[0])\n"
        "srv = socket.socket(); srv.bind(('127.0.0.1', 0)); srv.listen()\n"
        "socket.create_connection(srv.getsockname(), timeout=1).close(); print('loopback ok')\n"
    )
    proc = _airgapped(f"{sys.executable} -c \"{code}\"", dict(os.environ), timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split("\n")[:4] == ["refused 192.0.2.1", "refused example.com", "refused 2001:db8::1",
                                           "loopback ok"]


LOOKUPS = r'''
import socket, sys
if sys.argv[1] == "guarded":
    from garrison.policies import network_guard
    network_guard.install()
calls = [(socket.gethostbyname, ("example.com",)), (socket.gethostbyname_ex, ("example.org",)),
         (socket.gethostbyaddr, ("192.0.2.7",)), (socket.getnameinfo, (("192.0.2.8", 80), 0)),
         (socket.getaddrinfo, ("example.net", 443))]
refused = 0
for fn, args in calls:
    try:
        fn(*args)
    except PermissionError:
        refused += 1
    except OSError:
        pass  # no network here: the resolver tried and failed
socket.gethostbyname("localhost")  # local names still resolve (from /etc/hosts)
print(refused)
'''


@pytest.mark.skipif(shutil.which("strace") is None, reason="strace (Debian's strace) shows the system calls")
def test_guard_covers_every_name_lookup_and_no_dns_query_leaves(tmp_path: Path) -> None:
    """Under strace: unguarded, the resolver connects to the nameservers' port 53; guarded, all five entry
    points are refused before the C library is called, and no system call reaches port 53."""
    traffic = {}
    for mode in ("unguarded", "guarded"):
        trace = tmp_path / f"{mode}.strace"
        proc = subprocess.run(["strace", "-f", "-e", "trace=connect,sendto,sendmsg,sendmmsg", "-o", str(trace),
                               sys.executable, "-c", LOOKUPS, mode], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr[-2000:]
        traffic[mode] = (int(proc.stdout.strip().splitlines()[-1]), trace.read_text().count("htons(53)"))
    assert traffic["guarded"] == (5, 0)
    assert traffic["unguarded"][0] == 0
    if Path("/etc/resolv.conf").exists() and "nameserver" in Path("/etc/resolv.conf").read_text():
        assert traffic["unguarded"][1] > 0, "the unguarded control should have queried a nameserver"
