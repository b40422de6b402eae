"""`garrison identity` and `garrison seal`: the appliance's public keys, and sealing data for it.

Registered on the main group by garrison/cli.py (`cli.add_command(identity_command)`,
`cli.add_command(seal_command)`). The two configuration options are declared here rather than
imported from garrison.cli, because cli.py imports this module and the import must not cycle.
"""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path

import click

from garrison.cli_options import config_options, load
from garrison.errors import Conflict, InvalidRequest


@click.command("identity")
@config_options
@click.option("--json", "as_json", is_flag=True, help="Print the recipient and the signing public key as JSON.")
@click.pass_context
def identity_command(ctx: click.Context, config_file: str | None, state_dir: str | None, as_json: bool) -> None:
    """Print the appliance's age recipient (age1...): seal data for it with `age -r` or `garrison seal`.

    The identity is created on first use and kept encrypted under the master key.
    """
    from garrison.crypto.identity import load_appliance_identity

    identity = load_appliance_identity(load(ctx, config_file, state_dir))
    if as_json:
        click.echo(json.dumps(identity.public_json(), indent=2))
    else:
        click.echo(identity.recipient)


@click.command("seal")
@config_options
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("-r", "--recipient", "recipients", multiple=True, metavar="AGE1...",
              help="Seal for this recipient instead of the local appliance (repeatable).")
@click.option("-o", "--output", "output", default=None, type=click.Path(dir_okay=False, path_type=Path),
              help="Output file (default FILE.age).")
@click.option("-a", "--armor", is_flag=True, help="Write ASCII armor (PEM) instead of binary.")
@click.option("--force", is_flag=True, help="Replace the output file if it exists.")
@click.pass_context
def seal_command(ctx: click.Context, config_file: str | None, state_dir: str | None, file: Path,
                 recipients: tuple[str, ...], output: Path | None, armor: bool, force: bool) -> None:
    """Encrypt FILE in the age format for the appliance (or for -r recipients).

    Without -r the recipient is that of the appliance whose state folder is local (it must exist:
    on another machine, pass -r with the output of `garrison identity`). The output appears complete or
    not at all: it is written to a temporary file beside it and renamed once flushed to disk.
    """
    from garrison.crypto.age import parse_recipient

    if recipients:
        for recipient in recipients:
            parse_recipient(recipient)  # refuse a typo before reading any data
        targets = list(recipients)
    else:
        from garrison.crypto.identity import load_appliance_identity

        targets = [load_appliance_identity(load(ctx, config_file, state_dir), create=False).recipient]
    out = output or file.with_name(file.name + ".age")
    if not out.parent.is_dir():
        raise InvalidRequest(f"the output folder {out.parent} does not exist", param="output")
    if out.resolve() == file.resolve():
        raise InvalidRequest("the output file must differ from the input", param="output")
    if out.exists() and not force:
        raise Conflict(f"{out} exists; pass --force to replace it", code="output_exists", param="output")
    size = _seal_atomic(file, out, targets, armor=armor)
    click.echo(f"sealed {file} ({size} bytes) -> {out} for {', '.join(targets)}")


def _seal_atomic(src: Path, out: Path, recipients: list[str], *, armor: bool) -> int:
    """Encrypt into a temporary beside `out`, fsync, rename, fsync the folder; remove it on failure."""
    from garrison.crypto.age import encrypt_stream

    tmp = out.with_name(f".{out.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        with os.fdopen(fd, "wb") as dst, src.open("rb") as fh:
            size = encrypt_stream(fh, dst, recipients, armor=armor)
            dst.flush()
            os.fsync(dst.fileno())
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    dir_fd = os.open(out.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return size
