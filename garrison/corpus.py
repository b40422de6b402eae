"""A small built-in English corpus, so tokenizers and demo models can be made offline.

No model or dataset can be downloaded on the appliance; the tiny models that tests,
benchmarks and `garrison quickstart` use are trained on this text and nothing else.
"""

from __future__ import annotations

PARAGRAPHS: tuple[str, ...] = (
    "Garrison is an appliance that runs language models on the customer's own machine. "
    "It ingests encrypted data, fine-tunes models, converts them to GGUF and ONNX, and serves them.",
    "The daemon listens on the loopback address and needs a key for every route but health. "
    "Keys carry scopes such as infer, ingest, train, export and admin.",
    "A job is a row in the catalog. It is queued, then running, then it succeeds, fails or is cancelled. "
    "Workers report progress and checkpoints so that a restart resumes the work.",
    "The vault keeps each dataset version encrypted with its own data key, and the master key wraps the data keys. "
    "Deleting a dataset destroys its key, so the data cannot be read again.",
    "Quantization makes a model smaller and faster. Q8_0 keeps almost all of the quality, "
    "Q4_K_M is a good balance, and the parity gate checks every artifact against its source.",
    "The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins with a single step. "
    "All that glitters is not gold. Time and tide wait for no one.",
    "Hello! How can I help you today? I can answer questions about your documents, "
    "summarize a report, or draft a reply to a customer.",
    "The weather today is sunny with a light breeze from the west. Tomorrow brings clouds and a chance of rain "
    "in the afternoon, with temperatures between twelve and eighteen degrees.",
    "One, two, three, four, five, six, seven, eight, nine, ten. Monday, Tuesday, Wednesday, Thursday, Friday, "
    "Saturday, Sunday. January, February, March, April, May, June, July, August.",
    "Security-minded companies want their data to stay on their own hardware. No network connection leaves "
    "the appliance, and every request is written to a tamper-evident audit trail.",
    "def add(a, b):\n    return a + b\n\nfor i in range(10):\n    print(i * i)\n",
    "User: What is the capital of France?\nAssistant: The capital of France is Paris.\n"
    "User: And of Italy?\nAssistant: The capital of Italy is Rome.",
)


def corpus_text(repeat: int = 20) -> str:
    """The corpus repeated, so a tokenizer trainer sees every piece often enough."""
    return "\n".join(PARAGRAPHS * repeat)


def corpus_lines() -> list[str]:
    return [line for p in PARAGRAPHS for line in p.splitlines() if line.strip()]


# Standard-library modules whose documentation every Python install carries.
DOC_MODULES: tuple[str, ...] = (
    "collections", "json", "os", "pathlib", "re", "string", "textwrap", "itertools", "functools", "datetime",
    "logging", "argparse", "subprocess", "threading", "asyncio", "sqlite3", "csv", "random", "statistics",
    "decimal", "fractions", "unittest", "typing", "dataclasses", "enum", "shutil", "tempfile", "zipfile",
    "tarfile", "hashlib", "secrets", "base64", "urllib.parse", "html", "email.message", "http.client", "heapq",
    "bisect", "contextlib", "calendar", "difflib", "pprint", "io", "socket", "struct", "uuid", "queue",
    "glob", "fnmatch", "configparser", "codecs", "operator", "copy", "pickle", "zlib", "gzip", "inspect",
    "traceback", "warnings", "abc", "numbers", "array", "weakref", "types", "time", "signal", "selectors",
    "smtplib", "getpass", "platform", "doctest", "timeit", "tracemalloc", "gc", "sysconfig",
)
LICENSE_DIRS: tuple[str, ...] = ("/usr/share/common-licenses",)


def _docstrings(module_names: tuple[str, ...]) -> list[str]:
    import importlib
    import inspect

    seen: set[int] = set()
    docs: list[str] = []
    for name in module_names:
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        for obj in (module, *(value for _, value in inspect.getmembers(module))):
            if id(obj) in seen or not (obj is module or inspect.isclass(obj) or inspect.isroutine(obj)):
                continue
            seen.add(id(obj))
            doc = inspect.getdoc(obj)
            if doc and len(doc) > 80:
                docs.append(doc)
    return docs


def machine_corpus(max_chars: int = 2_000_000) -> str:
    """English text every machine has: licence texts and Python's own documentation.

    The default base model of `garrison quickstart` is pre-trained on it, so it writes
    English-like text without anything being downloaded. Deterministic for a given machine.
    """
    import sys
    from pathlib import Path

    parts: list[str] = list(PARAGRAPHS)
    for folder in LICENSE_DIRS:
        root = Path(folder)
        if root.is_dir():
            for path in sorted(root.iterdir()):
                if path.is_file() and path.stat().st_size < 200_000:
                    parts.append(path.read_text(encoding="utf-8", errors="ignore"))
    python_license = Path(sys.base_prefix) / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / \
        "LICENSE.txt"
    if python_license.exists():
        parts.append(python_license.read_text(encoding="utf-8", errors="ignore"))
    parts.extend(_docstrings(DOC_MODULES))
    text = "\n\n".join(p.strip() for p in parts if p.strip())
    return text[:max_chars]
