"""`python -m garrison` and the `garrison` command: the CLI, imported only once it runs.

Large ingestions are redacted by worker processes that multiprocessing starts with `spawn`, and
spawn re-runs the parent's main script in each worker (as `__mp_main__`, without calling it). For
the `garrison` command that script imports this module, so it imports nothing: a worker that
imported the whole CLI would spend a third of a second of CPU on it.
"""

from __future__ import annotations


def main(argv: list[str] | None = None) -> None:
    from garrison.cli import main as cli

    cli(argv)


if __name__ == "__main__":
    main()
