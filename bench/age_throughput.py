"""age throughput: Garrison's age (garrison.crypto.age) against Debian's `age`, in one run (not a test).

Encrypts and decrypts the same 100 MB file (binary and armored) with both, file to file, and
checks each output opens with the other implementation. Ours runs in a child Python process that
times only the streaming call (no interpreter start-up); Debian's age is timed from exec to exit.
Peak RSS of each child comes from wait4(). Writes bench/out/age_throughput.json and prints a
markdown table.

    .venv/bin/python bench/age_throughput.py [--mb 100] [--runs 3]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

OUT = Path(__file__).resolve().parent / "out"
REPO = Path(__file__).resolve().parent.parent

# Child for our side: times the call alone, prints seconds.
OURS = r"""
import sys, time
from garrison.crypto import age
op, src, dst, key, armor = sys.argv[1:6]
with open(src, "rb") as fin, open(dst, "wb") as fout:
    started = time.perf_counter()
    if op == "encrypt":
        age.encrypt_stream(fin, fout, [key], armor=armor == "1")
    else:
        for chunk in age.decrypt_stream(fin, age.parse_identity_file(open(key).read())):
            fout.write(chunk)
    print(time.perf_counter() - started)
"""


def run_child(args: list[str]) -> tuple[float, float, str]:
    """(wall seconds, peak RSS MiB, stdout) of one child process."""
    started = time.perf_counter()
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO)
    assert proc.stdout is not None and proc.stderr is not None
    out = proc.stdout.read().decode()
    err = proc.stderr.read().decode()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - started
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise SystemExit(f"{args[:3]} failed ({proc.returncode}): {err}")
    return wall, usage.ru_maxrss / 1024, out


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mb", type=int, default=100, help="plaintext size in MB (10^6 bytes)")
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    size = args.mb * 1_000_000
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="age-bench-") as tmp:
        folder = Path(tmp)
        plain = folder / "plain.bin"
        with plain.open("wb") as fh:
            for _ in range(size // 1_000_000):
                fh.write(os.urandom(1_000_000))
        expected = sha256(plain)
        keyfile = folder / "key.txt"
        subprocess.run(["age-keygen", "-o", str(keyfile)], check=True, capture_output=True)
        recipient = subprocess.run(["age-keygen", "-y", str(keyfile)], check=True, capture_output=True,
                                   text=True).stdout.strip()
        for armor in (False, True):
            mode = "armored" if armor else "binary"
            for tool in ("garrison", "debian-age"):
                sealed = folder / f"{tool}.{mode}.age"
                opened = folder / f"{tool}.{mode}.out"
                timings: dict[str, list[tuple[float, float]]] = {"encrypt": [], "decrypt": []}
                for _ in range(args.runs):
                    if tool == "garrison":
                        wall, rss, out = run_child([sys.executable, "-c", OURS, "encrypt", str(plain), str(sealed),
                                                    recipient, "1" if armor else "0"])
                        timings["encrypt"].append((float(out), rss))
                        wall, rss, out = run_child([sys.executable, "-c", OURS, "decrypt", str(sealed), str(opened),
                                                    str(keyfile), "0"])
                        timings["decrypt"].append((float(out), rss))
                    else:
                        wall, rss, _ = run_child(["age", *(["-a"] if armor else []), "-r", recipient,
                                                  "-o", str(sealed), str(plain)])
                        timings["encrypt"].append((wall, rss))
                        wall, rss, _ = run_child(["age", "-d", "-i", str(keyfile), "-o", str(opened), str(sealed)])
                        timings["decrypt"].append((wall, rss))
                    assert sha256(opened) == expected, f"{tool} {mode} round trip differs"
                # Cross-check: the other implementation opens this one's output.
                if tool == "garrison":
                    run_child(["age", "-d", "-i", str(keyfile), "-o", str(opened), str(sealed)])
                else:
                    run_child([sys.executable, "-c", OURS, "decrypt", str(sealed), str(opened), str(keyfile), "0"])
                assert sha256(opened) == expected, f"cross-check of {tool} {mode} output failed"
                for op, samples in timings.items():
                    seconds = statistics.median(s for s, _ in samples)
                    results.append({"tool": tool, "mode": mode, "op": op, "seconds_median": seconds,
                                    "mb_per_s": size / 1e6 / seconds, "peak_rss_mib": max(r for _, r in samples),
                                    "runs": [s for s, _ in samples]})
                sealed.unlink()
                opened.unlink()
    report = {"plaintext_bytes": size, "runs": args.runs, "cpus": os.cpu_count(), "python": platform.python_version(),
              "age_version": subprocess.run(["age", "--version"], capture_output=True, text=True).stdout.strip(),
              "results": results}
    OUT.mkdir(exist_ok=True)
    (OUT / "age_throughput.json").write_text(json.dumps(report, indent=2))
    table = [f"| tool | mode | op | MB/s (median of {args.runs}) | seconds | peak RSS |", "|---|---|---|---|---|---|"]
    for r in results:
        table.append(f"| {r['tool']} | {r['mode']} | {r['op']} | {r['mb_per_s']:.0f} | {r['seconds_median']:.3f} "
                     f"| {r['peak_rss_mib']:.0f} MiB |")
    (OUT / "age_throughput.md").write_text("\n".join(table) + "\n")
    print(f"{args.mb} MB, age {report['age_version']}, {report['cpus']} CPUs")
    print("\n".join(table))


if __name__ == "__main__":
    main()
