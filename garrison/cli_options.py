"""What every `garrison` command shares: --config/--state-dir and the configuration they load.

Its own module so commands defined beside the code they drive (crypto, ingestion) use the
same options and precedence as those in garrison.cli without importing it (no cycle).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any, TypeVar

import click

from garrison.config import Config, load_config

F = TypeVar("F", bound=Callable[..., Any])


def config_options(func: F) -> F:
    """--config and --state-dir on every command, so they work before or after it."""
    func = click.option("--state-dir", "state_dir", default=None, metavar="DIR",
                        help="State folder (env GARRISON_STATE_DIR).")(func)
    func = click.option("--config", "config_file", default=None, metavar="FILE",
                        type=click.Path(dir_okay=False),
                        help="TOML configuration (default /etc/garrison/garrison.toml if present).")(func)
    return func


def config_loader(ctx: click.Context, config_file: str | None, state_dir: str | None,
                  listen: str | None = None) -> Callable[[], Config]:
    root = ctx.find_root().obj or {}
    file_ = config_file or root.get("config_file")
    if file_:
        os.environ["GARRISON_CONFIG"] = file_  # job workers started from here read the same file
    overrides = {"state_dir": state_dir or root.get("state_dir"), "listen": listen}
    return lambda: load_config(file_, overrides=overrides)


def load(ctx: click.Context, config_file: str | None, state_dir: str | None) -> Config:
    return config_loader(ctx, config_file, state_dir)()


def echo_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, default=str))
