"""PII detection accuracy per entity type and redaction throughput (not a test; figures for the issue note).

Generates the labelled corpus of tests/ingest/pii_corpus.py at a larger size, scores
Garrison's detectors span by span (exact start, end and type), and measures throughput
on that PII-dense corpus and on mostly clean text (this repository's docs and source).
Side by side in the same run, the peer: Microsoft Presidio's pattern recognizers, when
`presidio_analyzer` is installed (it is not a dependency and is never installed by this
script; without it the peer column says so). Writes bench/out/pii_accuracy.json and
bench/out/pii_accuracy.md and prints the table.

    .venv/bin/python bench/pii_accuracy.py [--records 50000] [--seed 7]
"""

from __future__ import annotations

import argparse
import functools
import json
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
OUT = Path(__file__).resolve().parent / "out"
sys.path.insert(0, str(ROOT / "tests" / "ingest"))

from pii_corpus import TYPES, Record, errors, generate, score  # noqa: E402

from garrison.ingest.pii import Redactor  # noqa: E402
from garrison.ingest.policy import RedactionPolicy  # noqa: E402

Find = Callable[[str], list[tuple[int, int, str]]]
BENCH_KEY = b"bench-key-not-secret-0123456789ab"


def best_of(n: int, fn: Callable[[], None]) -> float:
    """Seconds of the fastest of n runs: the machine is shared, the minimum is the least disturbed."""
    times = []
    for _ in range(n):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return min(times)


def clean_texts() -> list[str]:
    """Mostly PII-free text with the shapes real data has: prose, markdown, code."""
    files = sorted([*ROOT.glob("docs/**/*.md"), *ROOT.glob("garrison/**/*.py"), ROOT / "README.md"])
    return [line for f in files if f.is_file() for line in f.read_text(errors="replace").splitlines() if line]


def _each(fn: Callable[[str], object], texts: list[str]) -> None:
    for t in texts:
        fn(t)


def throughput(redactor: Redactor, texts: list[str], runs: int) -> dict[str, float]:
    """MB/s (UTF-8 bytes) and M chars/s of find and redact, one call per record."""
    nbytes = sum(len(t.encode()) for t in texts)
    nchars = sum(len(t) for t in texts)
    out: dict[str, float] = {"records": len(texts), "mbytes": nbytes / 1e6}
    for name, fn in (("find", redactor.find), ("redact", redactor.redact)):
        seconds = best_of(runs, functools.partial(_each, fn, texts))
        out[f"{name}_mb_per_s"] = nbytes / seconds / 1e6
        out[f"{name}_mchars_per_s"] = nchars / seconds / 1e6
    return out


# --------------------------------------------------------------------------- the peer

PRESIDIO_TYPES = {"EMAIL_ADDRESS": "email", "PHONE_NUMBER": "phone", "CREDIT_CARD": "payment_card",
                  "IBAN_CODE": "iban", "US_SSN": "us_ssn", "IP_ADDRESS": "ip"}


def presidio_finder() -> tuple[Find | None, str]:
    """Presidio's pattern recognizers run directly, without spaCy (no model, no download).

    AnalyzerEngine would load a spaCy model for context words; the pattern recognizers do
    not need one, and the appliance has no network to fetch one. Scores are not thresholded
    (AnalyzerEngine's default threshold is 0). Presidio has no PRC ID or generic secret
    recognizer; those rows say n/a.
    """
    try:
        from presidio_analyzer.predefined_recognizers import (
            CreditCardRecognizer,
            EmailRecognizer,
            IbanRecognizer,
            IpRecognizer,
            PhoneRecognizer,
            UsSsnRecognizer,
        )
    except ImportError as exc:
        return None, f"skipped: presidio_analyzer is not installed ({exc.name}); not installed by this benchmark"
    try:
        import presidio_analyzer

        version = getattr(presidio_analyzer, "__version__", "unknown")
        recognizers = [cls() for cls in (EmailRecognizer, PhoneRecognizer, CreditCardRecognizer, IbanRecognizer,
                                         IpRecognizer, UsSsnRecognizer)]
    except Exception as exc:  # a broken install is a finding, not a crash of the benchmark
        return None, f"skipped: presidio_analyzer failed to start: {exc!r}"

    def find(text: str) -> list[tuple[int, int, str]]:
        found: list[tuple[int, int, str]] = []
        for rec in recognizers:
            for res in rec.analyze(text, rec.supported_entities, None) or []:
                kind = PRESIDIO_TYPES.get(res.entity_type)
                if kind == "ip":
                    kind = "ipv6" if ":" in text[res.start:res.end] else "ipv4"
                if kind is not None:
                    found.append((res.start, res.end, kind))
        return found

    return find, f"presidio_analyzer {version}, pattern recognizers only (no spaCy context)"


# --------------------------------------------------------------------------- report

def markdown(result: dict[str, Any]) -> str:
    ours, peer = result["garrison"]["metrics"], result["peer"].get("metrics")
    lines = [
        f"PII detection: {result['records']} generated records (seed {result['seed']}), span-level exact match.",
        f"Peer: {result['peer']['note']}",
        "",
        "| type | support | Garrison P | Garrison R | Garrison F1 | FP | FN | Presidio P | Presidio R | Presidio F1 |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for t in TYPES:
        m = ours[t]
        row = (f"| {t} | {int(m['support'])} | {m['precision']:.4f} | {m['recall']:.4f} | {m['f1']:.4f} "
               f"| {int(m['fp'])} | {int(m['fn'])} |")
        p = peer.get(t) if peer else None
        row += (f" {p['precision']:.4f} | {p['recall']:.4f} | {p['f1']:.4f} |" if p else " n/a | n/a | n/a |")
        lines.append(row)
    lines += ["", "| throughput (one call per record, best of runs) | find MB/s | redact MB/s | records | MB |",
              "|---|---:|---:|---:|---:|"]
    for name, tp in result["throughput"].items():
        lines.append(f"| {name} | {tp['find_mb_per_s']:.2f} | {tp['redact_mb_per_s']:.2f} | {int(tp['records'])} "
                     f"| {tp['mbytes']:.2f} |")
    if result["peer"].get("find_mb_per_s"):
        peer_mb = result["peer"]["find_mb_per_s"]
        lines.append(f"| Presidio pattern recognizers, PII corpus | {peer_mb:.2f} | - | - | - |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--records", type=int, default=50_000)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--runs", type=int, default=3, help="throughput runs; the best is reported")
    args = ap.parse_args(argv)

    records: list[Record] = generate(args.records, seed=args.seed)
    texts = [r.text for r in records]
    redactor = Redactor(RedactionPolicy(), BENCH_KEY)

    def ours(text: str) -> list[tuple[int, int, str]]:
        return [(s.start, s.end, s.type) for s in redactor.find(text)]

    result: dict[str, Any] = {
        "records": args.records, "seed": args.seed, "python": sys.version.split()[0], "machine": platform.machine(),
        "date": time.strftime("%Y-%m-%d"),
        "garrison": {"metrics": score(records, ours), "errors_sample": errors(records, ours, limit=20)},
        "throughput": {
            "PII-dense corpus": throughput(redactor, texts, args.runs),
            "clean text (repo docs + source, per line)": throughput(redactor, clean_texts(), args.runs),
            "PII-dense corpus, hash action": throughput(
                Redactor(RedactionPolicy(default="hash"), BENCH_KEY), texts, args.runs),
        },
    }

    peer_find, note = presidio_finder()
    result["peer"] = {"note": note}
    if peer_find is not None:
        seconds = best_of(1, lambda: _each(peer_find, texts))
        result["peer"]["find_mb_per_s"] = sum(len(t.encode()) for t in texts) / seconds / 1e6
        result["peer"]["metrics"] = score(records, peer_find, types=tuple(
            t for t in TYPES if t not in ("prc_id", "secret")))

    OUT.mkdir(exist_ok=True)
    (OUT / "pii_accuracy.json").write_text(json.dumps(result, indent=2) + "\n")
    table = markdown(result)
    (OUT / "pii_accuracy.md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
