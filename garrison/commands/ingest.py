"""`garrison ingest` and `garrison datasets list|show|rm`.

Registered on the main group by garrison/cli.py; a face over ingestion and the operations layer
(the whole policy file is validated here, which the ingest package cannot do). Like every
administrative command they act on the local state folder (file permissions are the authority),
whether or not the daemon runs, and they call the same library functions as the HTTP API:
`ingest` runs `garrison.ingest.pipeline.ingest` in this process, so a file is refused or accepted
by exactly the rules an upload meets.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from garrison.cli_options import config_options, load
from garrison.ingest.formats import FORMATS, parse_columns
from garrison.operations import datasets as datasets_ops
from garrison.policies.keys import local_operator

if TYPE_CHECKING:
    from garrison.config import Config
    from garrison.ingest.pipeline import IngestPolicy

__all__ = ["datasets_group", "ingest_command"]


def _policy(config: Config, path: Path | None) -> IngestPolicy:
    """Ingestion's part of the policy file, after the whole file is validated, as the daemon does: a
    mistake in [rate_limits] refuses `garrison ingest` as it would refuse a start or a reload."""
    from garrison.operations.policy import AppliancePolicy, load_appliance_policy

    return (AppliancePolicy.from_file(path) if path is not None else load_appliance_policy(config)).ingest


def _service(ctx: click.Context, config_file: str | None, state_dir: str | None) -> Any:
    from garrison.ingest.pipeline import IngestService
    from garrison.paths import StateLayout
    from garrison.store.catalog import Catalog

    config = load(ctx, config_file, state_dir)
    layout = StateLayout(config.state_path)
    layout.ensure()
    return IngestService(config, Catalog(layout.catalog), policy=lambda: _policy(config, None))


def _echo_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, default=str))


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


# -- ingest ----------------------------------------------------------------------------------------


@click.command("ingest")
@config_options
@click.argument("file", type=click.Path(exists=True, dir_okay=False, allow_dash=True))
@click.option("--dataset", "dataset", required=True, metavar="NAME", help="Dataset to add a version to.")
@click.option("--format", "fmt", default="auto", show_default=True, type=click.Choice(FORMATS),
              help="Record format (auto: by file name, then content).")
@click.option("--columns", default=None, metavar="T=COL,...",
              help="CSV column mapping onto prompt/completion, text or system/user/assistant.")
@click.option("--policy", "policy_file", default=None, type=click.Path(exists=True, dir_okay=False),
              help="Policy file (TOML: [redaction], retention_days, ...) instead of the appliance's.")
@click.option("--sealed/--plaintext", "sealed", default=None,
              help="Require an age file, or read plaintext (default: decide by the first bytes).")
@click.option("--json", "as_json", is_flag=True, help="Print the version and its report as JSON.")
@click.pass_context
def ingest_command(ctx: click.Context, config_file: str | None, state_dir: str | None, file: str, dataset: str,
                   fmt: str, columns: str | None, policy_file: str | None, sealed: bool | None, as_json: bool) -> None:
    """Ingest FILE (sealed with age, or plaintext; - for stdin) as a new version of a dataset.

    The file is decrypted in memory, validated, redacted by the policy and stored encrypted; a refused
    file stores nothing (exit code 2, the bad lines on stderr).
    """
    from tqdm import tqdm

    from garrison.ingest.pipeline import IngestRefused, IngestRequest

    service = _service(ctx, config_file, state_dir)
    service.recover()
    policy = _policy(service.config, Path(policy_file)) if policy_file else service.policy()
    name = "" if file == "-" else Path(file).name
    request = IngestRequest(dataset=dataset, source="cli", source_name=name, format=fmt,
                            columns=parse_columns(columns), sealed=sealed)
    total = None if file == "-" else Path(file).stat().st_size
    bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=f"ingest {dataset}", file=sys.stderr,
               disable=not sys.stderr.isatty(), leave=False)
    try:
        src = sys.stdin.buffer if file == "-" else open(file, "rb")  # noqa: SIM115 (closed below)
        try:
            result = datasets_ops.ingest(service, local_operator(), src, request, policy=policy,
                                         progress=bar.update)
        finally:
            if src is not sys.stdin.buffer:
                src.close()
    except IngestRefused as err:
        bar.close()
        for bad in err.details.get("report", {}).get("records_refused", [])[:20]:
            click.echo(f"  line {bad['line']}: {bad['reason']}", err=True)
        raise
    bar.close()
    if as_json:
        _echo_json(result.to_json())
        return
    r = result.report
    v = result.version
    if result.duplicate:
        click.echo(f"already ingested: these bytes are {v.reference} (nothing new stored)")
        return
    redactions = ", ".join(f"{k} {n}" for k, n in r.get("redactions", {}).items()) or "none"
    click.echo(f"{v.reference}: {r['records_accepted']} records accepted, {r['records_refused_count']} refused, "
               f"{r['records_dropped']} dropped by policy; redactions: {redactions}; "
               f"{_human(r['bytes_in'])} in {r['duration_s']:.2f}s")
    for bad in r.get("records_refused", [])[:20]:
        click.echo(f"  skipped line {bad['line']}: {bad['reason']}", err=True)


# -- datasets --------------------------------------------------------------------------------------


@click.group("datasets")
def datasets_group() -> None:
    """Datasets in the vault: list, show, rm (crypto-shredding)."""


@datasets_group.command("list")
@config_options
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def datasets_list(ctx: click.Context, config_file: str | None, state_dir: str | None, as_json: bool) -> None:
    """List datasets with their ready versions."""
    service = _service(ctx, config_file, state_dir)
    data = datasets_ops.list_datasets(service.catalog, local_operator())
    if as_json:
        _echo_json(data)
        return
    click.echo(f"{'NAME':32} {'VERSIONS':>8} {'LATEST':>6} {'RECORDS':>10} {'STORED':>10}")
    for d in data:
        click.echo(f"{d['name']:32} {d['versions']:>8} {d['latest_version'] or '-':>6} {d['records']:>10} "
                   f"{_human(d['stored_bytes']):>10}")


@datasets_group.command("show")
@config_options
@click.argument("reference", metavar="NAME[:VERSION]")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def datasets_show(ctx: click.Context, config_file: str | None, state_dir: str | None, reference: str,
                  as_json: bool) -> None:
    """Show a dataset and its versions, or one version with its ingestion report."""
    from garrison.ingest.datasets import parse_reference

    name, number = parse_reference(reference)
    catalog = _service(ctx, config_file, state_dir).catalog
    if number is None:
        data = datasets_ops.get_dataset(catalog, local_operator(), name)
        if as_json:
            _echo_json(data)
            return
        click.echo(f"{name}: {data['versions']} ready version(s), {data['records']} records")
        for v in data["data"]:
            click.echo(f"  v{v['version']:<4} {v['state']:8} {v['format']:10} {v['records']:>8} records  "
                       f"{_human(v['stored_bytes']):>10}  {v['source']}:{v['source_name']}")
        return
    record = datasets_ops.get_version(catalog, local_operator(), name, number)
    _echo_json(record.to_json())


@datasets_group.command("rm")
@config_options
@click.argument("reference", metavar="NAME[:VERSION]")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@click.pass_context
def datasets_rm(ctx: click.Context, config_file: str | None, state_dir: str | None, reference: str,
                yes: bool) -> None:
    """Delete a dataset (every version) or one version: its data key is destroyed, its files removed."""
    from garrison.ingest.datasets import parse_reference

    name, number = parse_reference(reference)
    service = _service(ctx, config_file, state_dir)
    what = f"{name}:{number}" if number is not None else f"dataset {name} (every version)"
    if not yes:
        click.confirm(f"Destroy the key of {what}? The data cannot be recovered", abort=True)
    if number is None:
        gone = datasets_ops.delete_dataset(service.vault, local_operator(), name)
        click.echo(f"deleted {name}: {len(gone)} version(s) shredded")
    else:
        datasets_ops.delete_version(service.vault, local_operator(), name, number)
        click.echo(f"deleted {name}:{number}")
