"""Ingest throughput: a sealed JSONL file with PII, end to end (open, parse, redact, encrypt, durable),
beside the same run's `age -d` and a parse-only Python pass over the same plaintext (not a test).

A throwaway appliance is made in a temporary folder; the input is sealed to it with Debian's `age`
(or garrison.crypto.age when age is missing). The pipeline runs in a child process that times only
the `ingest()` call; peak RSS comes from wait4(). Writes bench/out/ingest_throughput.json and .md.

    .venv/bin/python bench/ingest.py [--mb 100]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

OUT = Path(__file__).resolve().parent / "out"
REPO = Path(__file__).resolve().parent.parent

CHILD = r"""
import sys, time, json
from garrison.config import load_config
from garrison.ingest.pipeline import IngestRequest, IngestService
from garrison.paths import StateLayout
from garrison.store.catalog import Catalog
if len(sys.argv) > 2 and sys.argv[2] == "sequential":
    from garrison.ingest import parallel
    parallel.PARALLEL_MIN_BYTES = 1 << 62  # the in-process path, for an honest one-process row
config = load_config()
layout = StateLayout(config.state_path)
service = IngestService(config, Catalog(layout.catalog))
service.identity()
started = time.perf_counter()
with open(sys.argv[1], "rb") as src:
    result = service.ingest(src, IngestRequest(dataset="bench", source="cli", source_name="bench.jsonl.age"))
elapsed = time.perf_counter() - started
print(json.dumps({"seconds": elapsed, "report": result.report}))
"""

SETUP = r"""
from garrison.config import load_config
from garrison.crypto.age import encode_identity
from garrison.crypto.identity import load_appliance_identity
from garrison.paths import StateLayout
identity = load_appliance_identity(load_config())
StateLayout(load_config().state_path).ensure()
print(identity.recipient)
print(encode_identity(identity.age_identity))
"""


def make_input(path: Path, mb: float, seed: int = 7) -> int:
    """Chat records; about a third carry an e-mail, a phone number or a card number."""
    rng = random.Random(seed)
    target = int(mb * 1024 * 1024)
    size = 0
    with path.open("w") as fh:
        i = 0
        while size < target:
            kind = i % 6
            pii = (f"contact me at user{i}@example.com" if kind == 0 else
                   f"call +44 20 7946 {i % 10000:04d}" if kind == 1 else
                   "card 4111 1111 1111 1111" if kind == 2 else f"order {rng.randrange(10**8)} shipped")
            line = json.dumps({"messages": [
                {"role": "user", "content": f"Ticket {i}: {pii}. " + "The appliance keeps data sealed. " * 4},
                {"role": "assistant", "content": "Thanks, we are looking into it. " * 3}]}) + "\n"
            fh.write(line)
            size += len(line)
            i += 1
    return size


def run_child(args: list[str], env: dict[str, str]) -> tuple[float, float, str]:
    """(wall seconds, peak RSS MiB, stdout) of one child."""
    started = time.perf_counter()
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=REPO)
    assert proc.stdout is not None and proc.stderr is not None
    out = proc.stdout.read().decode()
    err = proc.stderr.read().decode()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - started
    if os.waitstatus_to_exitcode(status):
        raise SystemExit(f"{args[:3]} failed: {err[-2000:]}")
    return wall, usage.ru_maxrss / 1024, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=100.0)
    parser.add_argument("--rounds", type=int, default=5,
                        help="rounds of (parse-only, garrison, garrison in one process), interleaved; medians reported")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="garrison-bench-ingest-"))
    try:
        env = {**os.environ, "GARRISON_CONFIG": "/dev/null", "GARRISON_STATE_DIR": str(work / "state"),
               "XDG_CONFIG_HOME": str(work / "config"), "TMPDIR": str(work / "tmp")}
        (work / "tmp").mkdir()
        _, _, setup = run_child([sys.executable, "-c", SETUP], env)
        recipient, secret = setup.split()
        keyfile = work / "identity.txt"
        keyfile.write_text(secret + "\n")
        keyfile.chmod(0o600)
        plain = work / "bench.jsonl"
        size = make_input(plain, args.mb)
        sealed = work / "bench.jsonl.age"
        if shutil.which("age"):
            subprocess.run(["age", "-r", recipient, "-o", str(sealed), str(plain)], check=True)
            wall, rss, _ = run_child(["age", "-d", "-i", str(keyfile), "-o", os.devnull, str(sealed)], env)
            age_d = {"seconds": round(wall, 3), "mb_s": round(size / 1e6 / wall, 1), "peak_rss_mib": round(rss)}
        else:
            from garrison.crypto.age import encrypt_stream

            with plain.open("rb") as fin, sealed.open("wb") as fout:
                encrypt_stream(fin, fout, [recipient])
            age_d = None
        rounds: list[dict[str, float]] = []
        for _ in range(max(1, args.rounds)):  # interleaved: the machine's speed drifts over minutes
            started = time.perf_counter()
            records = 0
            with plain.open("rb") as fh:
                for line in fh:
                    json.loads(line)
                    records += 1
            parse_s = time.perf_counter() - started
            wall, rss, out = run_child([sys.executable, "-c", CHILD, str(sealed)], env)
            _, seq_rss, seq_out = run_child([sys.executable, "-c", CHILD, str(sealed), "sequential"], env)
            command = [str(Path(sys.executable).with_name("garrison")), "ingest", str(sealed), "--json"]
            cli_s, _, _ = run_child([*command, "--dataset", f"cli{len(rounds)}"], env)
            child = json.loads(out)
            rounds.append({"parse_s": parse_s, "seconds": child["seconds"], "seq_s": json.loads(seq_out)["seconds"],
                           "wall": wall, "rss": rss, "seq_rss": seq_rss, "cli_s": cli_s})
            print(f"round {len(rounds)}: parse-only {size / 1e6 / parse_s:.1f} MB/s, garrison "
                  f"{size / 1e6 / child['seconds']:.1f} MB/s, one process {size / 1e6 / rounds[-1]['seq_s']:.1f} MB/s, "
                  f"ratio {parse_s / child['seconds']:.3f}", file=sys.stderr)
        parse_s, seconds, seq_s, cli_s = (statistics.median(r[k] for r in rounds)
                                          for k in ("parse_s", "seconds", "seq_s", "cli_s"))
        wall = statistics.median(r["wall"] for r in rounds)
        rss, seq_rss = max(r["rss"] for r in rounds), max(r["seq_rss"] for r in rounds)
        report = child["report"]
        leftovers = [p.name for p in (work / "tmp").iterdir()]
        result = {
            "bench": "ingest_throughput", "plaintext_mb": round(size / 1e6, 1), "records": records,
            "sealed_bytes": sealed.stat().st_size, "machine": platform.machine(), "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "age_d": age_d,
            "parse_only": {"seconds": round(parse_s, 3), "mb_s": round(size / 1e6 / parse_s, 1)},
            "garrison_ingest": {"seconds": round(seconds, 3), "mb_s": round(size / 1e6 / seconds, 1),
                                "records_s": round(records / seconds), "peak_rss_mib": round(rss),
                                "wall_with_startup_s": round(wall, 3)},
            "garrison_ingest_one_process": {"seconds": round(seq_s, 3), "mb_s": round(size / 1e6 / seq_s, 1),
                                            "peak_rss_mib": round(seq_rss)},
            "garrison_cli_command": {"seconds": round(cli_s, 3), "mb_s": round(size / 1e6 / cli_s, 1)},
            "ratio_to_parse_only": round(parse_s / seconds, 3),
            "rounds": [{"parse_only_mb_s": round(size / 1e6 / r["parse_s"], 1),
                        "garrison_mb_s": round(size / 1e6 / r["seconds"], 1),
                        "one_process_mb_s": round(size / 1e6 / r["seq_s"], 1),
                        "ratio": round(r["parse_s"] / r["seconds"], 3)} for r in rounds],
            "redactions": report["redactions"], "records_accepted": report["records_accepted"],
            "temp_files_left": leftovers,
        }
        OUT.mkdir(exist_ok=True)
        (OUT / "ingest_throughput.json").write_text(json.dumps(result, indent=2) + "\n")
        rows = [("age -d (Debian)", age_d), ("parse-only Python (json.loads per line)", result["parse_only"]),
                ("garrison ingest (open, parse, redact, encrypt, durable)", result["garrison_ingest"]),
                ("garrison ingest, one process (no worker pool)", result["garrison_ingest_one_process"]),
                ("the `garrison ingest` command, whole (start and imports too)", result["garrison_cli_command"])]
        md = [f"Ingest of {result['plaintext_mb']} MB sealed JSONL ({records} chat records with PII), "
              f"{result['cpus']} CPUs, Python {result['python']}; medians of {len(rounds)} interleaved rounds.", "",
              "| pass | MB/s | seconds |", "|---|---|---|"]
        md += [f"| {name} | {r['mb_s']} | {r['seconds']} |" for name, r in rows if r]
        md += ["", "Per round (MB/s): " + "; ".join(f"parse-only {r['parse_only_mb_s']}, garrison {r['garrison_mb_s']} "
                                                 f"({r['ratio']}x)" for r in result["rounds"]) + "."]
        md += ["", f"garrison / parse-only: {result['ratio_to_parse_only']} (goal >= 0.5); peak RSS "
               f"{result['garrison_ingest']['peak_rss_mib']} MiB; redactions {report['redactions']}."]
        (OUT / "ingest_throughput.md").write_text("\n".join(md) + "\n")
        print("\n".join(md))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
