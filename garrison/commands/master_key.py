"""`garrison keys rotate-master | new-master-key | backup-master | restore-master`: the CLI face of
garrison.operations.master_key (registered on the `keys` group by garrison/cli.py)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import click

from garrison.cli_options import config_options, load
from garrison.config import Config
from garrison.crypto.age import IdentityLike, Passphrase, RecipientLike
from garrison.errors import InvalidRequest
from garrison.store.catalog import Catalog

PASSPHRASE_ENV = "GARRISON_BACKUP_PASSPHRASE"


def _actor() -> str:
    return f"local:{os.getuid()}"


def _catalog(config: Config) -> Catalog:
    from garrison.paths import StateLayout

    layout = StateLayout(config.state_path)
    layout.ensure()
    return Catalog(layout.catalog)


def _passphrase(confirm: bool) -> Passphrase:
    text = os.environ.get(PASSPHRASE_ENV)
    if text is None:
        text = click.prompt("Passphrase", hide_input=True, confirmation_prompt=confirm)
    if not text or (confirm and len(text) < 12):
        raise InvalidRequest("the backup passphrase must have at least 12 characters", code="passphrase_too_short",
                             param="passphrase")
    return Passphrase(text.encode())


@click.command("rotate-master")
@config_options
@click.option("--new-key", "new_key_file", type=click.Path(exists=True, dir_okay=False),
              help="File holding the new master key (make one with `garrison keys new-master-key FILE`).")
@click.option("--finish", is_flag=True, help="The new key works: delete the kept previous key and identity file.")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def rotate_master_command(ctx: click.Context, config_file: str | None, state_dir: str | None,
                          new_key_file: str | None, finish: bool, as_json: bool) -> None:
    """Rewrap every wrapped key and the identity under a new master key (data files untouched).

    Two-phase and journaled: it may run while the daemon serves (uploads that arrive meanwhile are
    wrapped under whichever key the catalog records at that instant), and a rotation interrupted at
    any point (kill -9, power loss) is rolled back or completed by running this command again, with
    or without --new-key. The old key is kept beside the new one as master.key.previous (mode 0600)
    until `--finish`. With a systemd credential, the key file behind it is rotated: restart the
    services afterwards so they load the new credential. Every attempt is in the audit trail.
    """
    from garrison.operations.master_key import finish_rotation, rotate_master

    config = load(ctx, config_file, state_dir)
    catalog = _catalog(config)
    if finish:
        if new_key_file:
            raise InvalidRequest("--finish takes no --new-key", param="finish")
        removed = finish_rotation(config, catalog, actor=_actor())
        click.echo(f"finished: removed {', '.join(str(p) for p in removed) or 'nothing (already removed)'}")
        return
    result = rotate_master(config, catalog, Path(new_key_file) if new_key_file else None, actor=_actor())
    if as_json:
        click.echo(json.dumps(result.as_dict(), indent=2))
        return
    if result.resumed == "already completed":
        click.echo(f"already rotated to this key ({result.rotation_id}); nothing to do")
        return
    if result.resumed:
        click.echo(f"an interrupted rotation was {result.resumed}")
    if new_key_file is None:
        if not result.resumed:
            click.echo("no rotation to complete; pass --new-key FILE to rotate")
        return
    counts = result.rewrapped
    click.echo(f"rotated: {counts.get('dataset_versions', 0)} dataset key(s) and {counts.get('wrapped_keys', 0)} "
               f"other key(s) rewrapped and verified, identity resealed; {result.key_file} holds the new key, the "
               f"old one is kept in {result.previous_key} until `garrison keys rotate-master --finish`")
    if result.credential:
        click.echo("the services read the key as a systemd credential: restart them (systemctl restart garrison "
                   "garrison-worker) so they load the new one")


@click.command("new-master-key")
@click.argument("path", type=click.Path(dir_okay=False))
def new_master_key_command(path: str) -> None:
    """Write a new random master key to PATH (64 hex digits, mode 0600; never overwrites a file)."""
    from garrison.operations.master_key import new_master_key_file

    click.echo(f"wrote a new master key to {new_master_key_file(Path(path))} (mode 0600)")


@click.command("backup-master")
@config_options
@click.option("--to", "dest", required=True, type=click.Path(dir_okay=False), help="The backup file to write.")
@click.option("--recipient", default=None, metavar="AGE1...",
              help="Seal to this age recipient (a recovery key kept offline); without it, a passphrase "
                   f"(age's scrypt recipient; prompted, or ${PASSPHRASE_ENV}).")
@click.pass_context
def backup_master_command(ctx: click.Context, config_file: str | None, state_dir: str | None, dest: str,
                          recipient: str | None) -> None:
    """Write the master key sealed with age, for recovery on a new machine (`garrison keys restore-master`).

    Without the master key, a copy of the state folder opens nothing: keep this file and its
    passphrase or recovery key apart, offline. `age -d` opens it too (the key is inside as JSON).
    """
    from garrison.operations.master_key import backup_master

    config = load(ctx, config_file, state_dir)
    sealed_to: RecipientLike = recipient if recipient else _passphrase(confirm=True)
    out = backup_master(config, _catalog(config), Path(dest), sealed_to, actor=_actor())
    click.echo(f"master key (check value {out['kcv'][:12]}...) sealed to a {out['sealed_to']} in {out['to']}")


@click.command("restore-master")
@config_options
@click.option("--from", "src", required=True, type=click.Path(exists=True, dir_okay=False),
              help="A backup written by `garrison keys backup-master`.")
@click.option("--identity", "identity_file", default=None, type=click.Path(exists=True, dir_okay=False),
              help="The age identity file of the recovery recipient; without it, the passphrase.")
@click.option("--force", is_flag=True, help="Install even over another key (kept as .previous) or a mismatch.")
@click.pass_context
def restore_master_command(ctx: click.Context, config_file: str | None, state_dir: str | None, src: str,
                           identity_file: str | None, force: bool) -> None:
    """Install a backed-up master key as this machine's key, after checking it opens this state folder."""
    from garrison.crypto.age import parse_identity_file
    from garrison.operations.master_key import restore_master

    config = load(ctx, config_file, state_dir)
    identity: IdentityLike = (parse_identity_file(Path(identity_file).read_text())[0] if identity_file
                              else _passphrase(False))
    out = restore_master(config, Path(src), identity, force=force, actor=_actor())
    click.echo(f"installed the master key in {out['installed']}" if out["changed"]
               else f"{out['installed']} already holds this key")
