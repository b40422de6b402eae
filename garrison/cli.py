"""The `garrison` command: a thin click layer over the library's operations.

Administrative commands act on the local state folder (file permissions are the
authority), whether or not the daemon runs. A long operation is a job in the catalog:
the daemon's runner takes it when the daemon runs, otherwise this process runs it in the
foreground; either way the command shows its progress until it ends (`--detach` returns
at once). Errors map to exit codes in one place, `main()`.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

import click

from garrison import __version__
from garrison.cli_options import F, config_loader, config_options, echo_json
from garrison.config import Config, settings_help
from garrison.errors import GarrisonError, InvalidRequest, JobFailed, exit_code_for
from garrison.jobs.kinds import JOB_KINDS
from garrison.jobs.store import Job, JobStore
from garrison.operations import jobs as jobs_ops
from garrison.operations import keys as keys_ops
from garrison.operations import models as models_ops
from garrison.operations.appliance import open_appliance
from garrison.paths import StateLayout
from garrison.policies.keys import KeyStore, local_operator
from garrison.policies.scopes import ROLE_DESCRIPTIONS, ROLES
from garrison.store.catalog import Catalog


# -- configuration -------------------------------------------------------------
def _open(ctx: click.Context, config_file: str | None, state_dir: str | None) -> tuple[Config, Catalog]:
    config = config_loader(ctx, config_file, state_dir)()
    layout = StateLayout(config.state_path)
    layout.ensure()
    return config, Catalog(layout.catalog)


def _when(stamp: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(stamp)) if stamp else "-"


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="garrison")
@click.option("--config", "config_file", default=None, metavar="FILE", help="TOML configuration file.")
@click.option("--state-dir", "state_dir", default=None, metavar="DIR", help="State folder.")
@click.pass_context
def cli(ctx: click.Context, config_file: str | None, state_dir: str | None) -> None:
    """Garrison: an on-premises LLM appliance."""
    ctx.obj = {"config_file": config_file, "state_dir": state_dir}


# -- daemon --------------------------------------------------------------------
@cli.command()
@config_options
@click.option("--listen", default=None, metavar="HOST:PORT", help="Address to listen on (env GARRISON_LISTEN).")
@click.pass_context
def serve(ctx: click.Context, config_file: str | None, state_dir: str | None, listen: str | None) -> None:
    """Run the daemon: the HTTP API, and the job runner unless run_jobs is false."""
    from garrison.daemon.lifecycle import serve as run_serve

    sys.exit(run_serve(config_loader(ctx, config_file, state_dir, listen)))


@cli.command()
@config_options
@click.pass_context
def worker(ctx: click.Context, config_file: str | None, state_dir: str | None) -> None:
    """Run the job runner alone (the garrison-worker systemd unit)."""
    from garrison.daemon.lifecycle import run_worker

    sys.exit(run_worker(config_loader(ctx, config_file, state_dir)))


@cli.group("config")
def config_group() -> None:
    """Show and check the configuration."""


@config_group.command("show")
@config_options
@click.pass_context
def config_show(ctx: click.Context, config_file: str | None, state_dir: str | None) -> None:
    """Print the effective configuration and where it came from."""
    config = config_loader(ctx, config_file, state_dir)()
    echo_json({"source": config.source, **config.as_dict()})


@config_group.command("check")
@config_options
@click.pass_context
def config_check(ctx: click.Context, config_file: str | None, state_dir: str | None) -> None:
    """Validate the configuration; exit 2 naming the bad key."""
    config = config_loader(ctx, config_file, state_dir)()
    click.echo(f"configuration ok ({config.source})")


@config_group.command("keys")
def config_keys() -> None:
    """List every setting with its environment variable."""
    click.echo(settings_help())


# -- keys ------------------------------------------------------------------------
def _names(value: str | None) -> list[str] | None:
    return None if value is None else [v for v in value.split(",") if v.strip()]


@cli.group()
def keys() -> None:
    """API keys: create (shown once), list, revoke."""


@keys.command("create")
@config_options
@click.option("--role", required=True, type=click.Choice(list(ROLES)),
              help="; ".join(f"{r}: {d}" for r, d in ROLE_DESCRIPTIONS.items()))
@click.option("--name", default="", help="A label to recognise the key by.")
@click.option("--models", default=None, metavar="M,...", help="Only these models (default: all).")
@click.option("--datasets", default=None, metavar="D,...", help="Only these datasets (default: all).")
@click.option("--expires", default=None, metavar="WHEN", help="30d, 12h, 90m or an ISO date.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def keys_create(ctx: click.Context, config_file: str | None, state_dir: str | None, role: str, name: str,
                models: str | None, datasets: str | None, expires: str | None, as_json: bool) -> None:
    """Create a key and print it once; only its hash is stored."""
    _, catalog = _open(ctx, config_file, state_dir)
    record, secret = keys_ops.create_key(KeyStore(catalog), local_operator(), role, name=name, models=_names(models),
                                         datasets=_names(datasets), expires=expires)
    if as_json:
        echo_json({**record.to_json(), "key": secret})
        return
    click.echo(secret)
    click.echo(f"id {record.id}, role {record.role}; store the key now: it is not shown again.", err=True)


@keys.command("list")
@config_options
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def keys_list(ctx: click.Context, config_file: str | None, state_dir: str | None, as_json: bool) -> None:
    """List keys (never their secrets)."""
    _, catalog = _open(ctx, config_file, state_dir)
    records = keys_ops.list_keys(KeyStore(catalog), local_operator())
    if as_json:
        echo_json([r.to_json() for r in records])
        return
    click.echo(f"{'ID':22} {'ROLE':9} {'STATUS':8} {'PREFIX':14} {'EXPIRES':19} NAME")
    for r in records:
        click.echo(f"{r.id:22} {r.role:9} {r.status():8} {r.display_prefix:14} {_when(r.expires_at):19} "
                   f"{r.name}")


@keys.command("revoke")
@config_options
@click.argument("key_id")
@click.pass_context
def keys_revoke(ctx: click.Context, config_file: str | None, state_dir: str | None, key_id: str) -> None:
    """Revoke a key at once (the daemon checks the catalog on every request)."""
    _, catalog = _open(ctx, config_file, state_dir)
    record = keys_ops.revoke_key(KeyStore(catalog), local_operator(), key_id)
    click.echo(f"{record.id} revoked")


@keys.command("usage")
@config_options
@click.option("--key", "key_id", default=None, metavar="ID", help="Only this key.")
@click.option("--since", default=None, metavar="WHEN", help="90m, 12h, 7d, 2w, all (default) or an ISO date.")
@click.option("--by", default="model", show_default=True, type=click.Choice(["key", "model", "day", "hour"]),
              help="One line per key, per key and model, or per key, model and day or hour.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def keys_usage(ctx: click.Context, config_file: str | None, state_dir: str | None, key_id: str | None,
               since: str | None, by: str, as_json: bool) -> None:
    """Requests and tokens used by each key. A running daemon writes its counts every few seconds."""
    from garrison.operations.usage import GROUPINGS, usage_report

    _, catalog = _open(ctx, config_file, state_dir)
    report = usage_report(catalog, key_id=key_id, since=since, by=by)
    if as_json:
        echo_json(report)
        return
    labels = [("KEY", "key_id", 22), ("NAME", "key_name", 14)] + [
        (name.upper(), name, {"model": 24}.get(name, 20)) for name in GROUPINGS[by][1:]]
    counts = [("REQUESTS", "requests"), ("PROMPT", "prompt_tokens"), ("COMPLETION", "completion_tokens"),
              ("TOTAL", "total_tokens")]
    click.echo(" ".join([f"{title:{width}}" for title, _, width in labels] + [f"{t:>11}" for t, _ in counts]))
    for row in [*report["data"], {"key_id": "total", **report["totals"]}]:
        click.echo(" ".join([f"{str(row.get(name) or '')[:width]:{width}}" for _, name, width in labels]
                            + [f"{row[name]:>11}" for _, name in counts]))


# -- jobs ------------------------------------------------------------------------
class JobProgress:
    """A progress bar for one job, fed by catalog snapshots."""

    def __init__(self, job: Job, enabled: bool) -> None:
        from tqdm import tqdm

        self.bar = tqdm(total=100, desc=f"{job.kind} {job.id}", unit="%", disable=not enabled,
                        bar_format="{desc}: {percentage:3.0f}%|{bar}| {elapsed}<{remaining} {postfix}",
                        file=sys.stderr, dynamic_ncols=True)
        self.state = ""

    def update(self, job: Job) -> None:
        target = round(job.progress * 100, 1)
        if target > self.bar.n:
            self.bar.update(target - self.bar.n)
        postfix = f"{job.state} {job.progress_message}".strip()
        if job.state != self.state or postfix != self.bar.postfix:
            self.bar.set_postfix_str(postfix)
            self.state = job.state

    def close(self) -> None:
        self.bar.close()


def _follow(config: Config, catalog: Catalog, job: Job, *, show_bar: bool = True) -> Job:
    """Show a job's progress until it ends, running it here when no daemon runs."""
    from garrison.daemon.lifecycle import running_daemon
    from garrison.jobs.runner import JobRunner, RunnerSettings

    store = JobStore(catalog)
    progress = JobProgress(job, enabled=show_bar and sys.stderr.isatty())
    try:
        if running_daemon(StateLayout(config.state_path)) is not None:
            while not job.terminal:
                progress.update(job)
                time.sleep(0.25)
                job = store.get(job.id)
        else:
            settings = RunnerSettings(concurrency=1, poll_s=min(config.job_poll_s, 0.25),
                                      heartbeat_s=config.job_heartbeat_s,
                                      stale_after_s=config.job_stale_after_s,
                                      shutdown_grace_s=config.shutdown_grace_s)
            runner = JobRunner(store, lambda: settings)
            job = asyncio.run(runner.run_until_done(job.id, on_update=progress.update))
        progress.update(job)
    except KeyboardInterrupt:
        progress.close()
        click.echo(f"\ninterrupted; job {job.id} keeps its checkpoint: `garrison jobs watch {job.id}`"
                   " resumes it", err=True)
        sys.exit(130)
    finally:
        progress.close()
    return job


def _finish(job: Job, as_json: bool) -> None:
    if as_json:
        echo_json(job.to_json())
    else:
        click.echo(f"{job.id} {job.state}" + (f": {json.dumps(job.result)}" if job.result else ""))
    if job.state == "failed":
        raise JobFailed(f"job {job.id} failed: [{job.error_code}] {job.error_message}",
                        code=job.error_code or "job_failed")
    if job.state == "cancelled":
        sys.exit(1)


def _parse_params(pairs: tuple[str, ...]) -> dict[str, Any]:
    params: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise InvalidRequest(f"parameter {pair!r} is not KEY=VALUE", param="param")
        try:
            params[key] = json.loads(raw)
        except json.JSONDecodeError:
            params[key] = raw
    return params


def submit_job(ctx: click.Context, config_file: str | None, state_dir: str | None, kind: str,
               params: dict[str, Any], *, detach: bool, as_json: bool,
               max_attempts: int | None = None) -> None:
    """Queue a job and follow it: the shared path of every long-running command."""
    config, catalog = _open(ctx, config_file, state_dir)
    job = jobs_ops.submit_job(open_appliance(config, catalog), local_operator(), kind, params,
                              max_attempts=max_attempts)
    if detach:
        echo_json(job.to_json()) if as_json else click.echo(job.id)
        return
    _finish(_follow(config, catalog, job), as_json)


@cli.group()
def jobs() -> None:
    """Jobs: list, show, watch (progress bar), cancel, submit."""


@jobs.command("list")
@config_options
@click.option("--state", default=None, type=click.Choice(["queued", "running", "succeeded", "failed",
                                                           "cancelled"]))
@click.option("--kind", default=None)
@click.option("--limit", default=50, show_default=True)
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def jobs_list(ctx: click.Context, config_file: str | None, state_dir: str | None, state: str | None,
              kind: str | None, limit: int, as_json: bool) -> None:
    """List jobs, newest first."""
    config, catalog = _open(ctx, config_file, state_dir)
    found = jobs_ops.list_jobs(open_appliance(config, catalog), local_operator(), state=state, kind=kind, limit=limit)
    if as_json:
        echo_json([j.to_json() for j in found])
        return
    click.echo(f"{'ID':25} {'KIND':12} {'STATE':10} {'PROGRESS':>8} {'TRIES':>5} CREATED")
    for j in found:
        click.echo(f"{j.id:25} {j.kind:12} {j.state:10} {j.progress * 100:7.0f}% "
                   f"{j.attempts:>2}/{j.max_attempts:<2} {_when(j.created_at)}")


@jobs.command("show")
@config_options
@click.argument("job_id")
@click.option("--events", "with_events", is_flag=True, help="Include the job's events.")
@click.pass_context
def jobs_show(ctx: click.Context, config_file: str | None, state_dir: str | None, job_id: str,
              with_events: bool) -> None:
    """Show one job as JSON."""
    config, catalog = _open(ctx, config_file, state_dir)
    app = open_appliance(config, catalog)
    data = jobs_ops.get_job(app, local_operator(), job_id).to_json()
    if with_events:
        data["events"] = [e.to_json() for e in jobs_ops.job_events(app, local_operator(), job_id)]
    echo_json(data)


@jobs.command("watch")
@config_options
@click.argument("job_id")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def jobs_watch(ctx: click.Context, config_file: str | None, state_dir: str | None, job_id: str,
               as_json: bool) -> None:
    """Follow a job with a progress bar until it ends (runs it here if no daemon runs)."""
    config, catalog = _open(ctx, config_file, state_dir)
    job = JobStore(catalog).get(job_id)
    _finish(_follow(config, catalog, job), as_json)


@jobs.command("cancel")
@config_options
@click.argument("job_id")
@click.pass_context
def jobs_cancel(ctx: click.Context, config_file: str | None, state_dir: str | None, job_id: str) -> None:
    """Cancel a job: at once if queued, at its next check if running (keeping its checkpoint)."""
    config, catalog = _open(ctx, config_file, state_dir)
    job = jobs_ops.cancel_job(open_appliance(config, catalog), local_operator(), job_id)
    click.echo(f"{job.id} {'cancelled' if job.state == 'cancelled' else 'cancel requested'}")


@jobs.command("submit")
@config_options
@click.argument("kind", type=click.Choice(sorted(JOB_KINDS)))
@click.option("-p", "--param", "params", multiple=True, metavar="KEY=VALUE", help="A job parameter.")
@click.option("--max-attempts", type=int, default=None)
@click.option("--detach", is_flag=True, help="Queue and return at once.")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def jobs_submit(ctx: click.Context, config_file: str | None, state_dir: str | None, kind: str,
                params: tuple[str, ...], max_attempts: int | None, detach: bool, as_json: bool) -> None:
    """Queue a job of a built-in kind and follow it."""
    submit_job(ctx, config_file, state_dir, kind, _parse_params(params), detach=detach, as_json=as_json,
               max_attempts=max_attempts)


@cli.command()
@config_options
@click.option("--steps", default=20, show_default=True)
@click.option("--step-s", default=0.1, show_default=True)
@click.option("--detach", is_flag=True)
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def selftest(ctx: click.Context, config_file: str | None, state_dir: str | None, steps: int,
             step_s: float, detach: bool, as_json: bool) -> None:
    """Run the built-in self-test job: proves catalog, runner and workers on this machine."""
    submit_job(ctx, config_file, state_dir, "selftest", {"steps": steps, "step_s": step_s},
               detach=detach, as_json=as_json)


@cli.command()
@config_options
@click.option("--listen", default=None, metavar="HOST:PORT", help="Address to serve on (env GARRISON_LISTEN).")
@click.option("--no-serve", is_flag=True, help="Do everything, ask the question, then stop the daemon and exit.")
@click.option("--size", type=click.Choice(["base", "tiny"]), default="base", show_default=True,
              help="The default base model, or a tiny one (seconds; for tests and smoke runs).")
@click.option("--steps", type=int, default=0, help="Fine-tuning steps (0: the size's default).")
@click.pass_context
def quickstart(ctx: click.Context, config_file: str | None, state_dir: str | None, listen: str | None,
               no_serve: bool, size: str, steps: int) -> None:
    """The main job end to end, offline: base model, sealed ingestion, fine-tune, export, serve, ask.

    Builds the default base model (once; cached), seals the shipped sample support dataset to the
    appliance and ingests it (showing the redaction report), fine-tunes a LoRA on it, exports the
    merged model to GGUF Q4_K_M and ONNX int8 through the parity gate, serves it and asks it a
    question from the dataset through the OpenAI-compatible API. Prints a new admin key named
    "quickstart" once (earlier quickstart keys are revoked). A second run reuses the results.
    Ctrl-C or SIGTERM stops it, and the daemon it started with it.
    """
    from garrison.daemon.lifecycle import running_daemon
    from garrison.models.registry import ModelRegistry
    from garrison.quickstart import (
        SUFFIX,
        Stages,
        ask,
        sample_records,
        seal_and_ingest,
        snippets,
        start_daemon,
        stop_daemon,
        stop_on_sigterm,
    )

    stop_on_sigterm()
    load = config_loader(ctx, config_file, state_dir, listen)
    config, catalog = _open(ctx, config_file, state_dir)
    click.echo(f"state folder: {config.state_path}", err=True)
    stages = Stages()
    base = stages.run("1/5 default base model", lambda: _run_job(config, catalog, "build-default-model",
                                                                 {"size": size}))
    base_name = str((base.result or {})["model"])
    data = stages.run("2/5 seal the sample support dataset and ingest it", lambda: seal_and_ingest(config, catalog))
    tuned = f"{base_name}-ft-{SUFFIX}"
    served_model = f"{tuned}-merged:q4_k_m"
    registry = ModelRegistry(catalog, StateLayout(config.state_path))
    if data["duplicate"] and all(registry.exists(m) for m in (f"{tuned}:lora", served_model,
                                                               f"{tuned}-merged:onnx-int8")):
        click.echo("==> 3/5 fine-tune and export: already done for this dataset (reusing it)", err=True)
    else:
        params = {"model": base_name, "training_file": data["dataset"], "suffix": SUFFIX,
                  "hyperparameters": json.dumps({"n_epochs": 30, "batch_size": 8, "learning_rate_multiplier": 20}),
                  "max_steps": steps or (200 if size == "base" else 20), "max_seq_len": 512, "checkpoint_every": 50,
                  "export": "gguf:q4_k_m,onnx:int8"}
        stages.run("3/5 fine-tune a LoRA, export GGUF Q4_K_M and ONNX int8 (parity-gated)",
                   lambda: _run_job(config, catalog, "finetune", params))
    keys_ = KeyStore(catalog)
    for old in keys_.list(include_revoked=False):
        if old.name == "quickstart":
            keys_.revoke(old.id, actor="quickstart")
    _, secret = keys_.create("admin", name="quickstart", actor="quickstart")
    served_config = load()
    daemon = None
    if running_daemon(StateLayout(config.state_path)) is None:
        daemon = stages.run("4/5 start the daemon", lambda: start_daemon(served_config,
                                                                           config.state_path / "quickstart.log"))
    try:  # from here on, however quickstart ends (Ctrl-C, SIGTERM, an error), its daemon ends with it
        question = next(m["content"] for m in sample_records()[1]["messages"] if m["role"] == "user")
        answer = stages.run("5/5 ask the fine-tuned model a question from the dataset",
                            lambda: ask(served_config, secret, served_model, question))
        click.echo(f"\n  Q: {question}\n  A ({served_model}): {answer}\n")
        click.echo("stage times: " + ", ".join(f"{name.split(' ', 1)[0]} {t:.1f}s"
                                               for name, t in stages.timings.items())
                   + f" (total {sum(stages.timings.values()):.1f}s)", err=True)
        click.echo(f"admin key (shown once): {secret}")
        click.echo(snippets(served_config, secret, served_model))
        if daemon is None:
            click.echo("a daemon already serves this state folder", err=True)
            return
        if no_serve:
            return
        click.echo(f"serving on {served_config.base_url} (Ctrl-C stops)", err=True)
        try:
            sys.exit(daemon.wait())
        except KeyboardInterrupt:  # Ctrl-C or SIGTERM while serving: a clean stop, the daemon's own exit code
            sys.exit(stop_daemon(daemon))
    finally:
        if daemon is not None:
            stop_daemon(daemon)


def _run_job(config: Config, catalog: Catalog, kind: str, params: dict[str, Any]) -> Job:
    job = jobs_ops.submit_job(open_appliance(config, catalog), local_operator(), kind, params)
    job = _follow(config, catalog, job)
    if job.state != "succeeded":
        _finish(job, as_json=False)
    return job


# -- models --------------------------------------------------------------------------
@cli.group()
def models() -> None:
    """Models: import (GGUF file, Hugging Face or ONNX folder), list, show, rm."""


@models.command("import")
@config_options
@click.argument("path", type=click.Path(exists=False))
@click.option("--name", default=None, help="Model name (default: the file or folder name).")
@click.option("--parallel", "n_parallel", type=int, default=None, help="Sequences decoded together (GGUF).")
@click.option("--ctx", "n_ctx_per_slot", type=int, default=None, help="Context tokens per sequence (GGUF).")
@click.option("--gpu-layers", "n_gpu_layers", type=int, default=None, help="Layers offloaded to the GPU (GGUF).")
@click.option("--gpu", type=int, default=None, help="Serve on this GPU only (its index; default: every GPU).")
@click.option("--base", default=None,
              help="For an adapter: the model it adapts (a GGUF LoRA on a GGUF model, a peft folder on a HF model).")
@click.option("--queue", "max_queue", type=int, default=None,
              help="Requests that may wait beyond the slots before 429 (default: model_queue).")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def models_import(ctx: click.Context, config_file: str | None, state_dir: str | None, path: str,
                  name: str | None, n_parallel: int | None, n_ctx_per_slot: int | None, n_gpu_layers: int | None,
                  gpu: int | None, base: str | None, max_queue: int | None, as_json: bool) -> None:
    """Copy a model into the state folder, hashing every file into its manifest."""
    from tqdm import tqdm

    config, catalog = _open(ctx, config_file, state_dir)
    bar = tqdm(unit="B", unit_scale=True, desc="import", disable=not sys.stderr.isatty())

    def progress(done: int, total: int) -> None:
        bar.total = total
        bar.update(done - bar.n)

    try:
        record = models_ops.import_model(open_appliance(config, catalog), local_operator(), path, name,
                                         settings={"n_parallel": n_parallel, "n_ctx_per_slot": n_ctx_per_slot,
                                                   "n_gpu_layers": n_gpu_layers, "max_queue": max_queue, "gpu": gpu},
                                         base=base, progress=progress)
    finally:
        bar.close()
    if as_json:
        echo_json(record.to_json())
    else:
        click.echo(f"{record.name} ({record.format}, {record.size_bytes} bytes, {len(record.manifest['files'])} "
                   f"file(s) hashed)")


@models.command("list")
@config_options
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def models_list(ctx: click.Context, config_file: str | None, state_dir: str | None, as_json: bool) -> None:
    """List models."""
    config, catalog = _open(ctx, config_file, state_dir)
    records = models_ops.list_models(open_appliance(config, catalog), local_operator())
    if as_json:
        echo_json([r.to_json() for r in records])
        return
    click.echo(f"{'NAME':32} {'FORMAT':6} {'SIZE':>12} {'SERVABLE':8} CREATED")
    for r in records:
        click.echo(f"{r.name:32} {r.format:6} {r.size_bytes:>12} {'yes' if r.servable else 'no':8} "
                   f"{_when(r.created_at)}")


@models.command("show")
@config_options
@click.argument("name")
@click.pass_context
def models_show(ctx: click.Context, config_file: str | None, state_dir: str | None, name: str) -> None:
    """Show one model and its manifest as JSON."""
    config, catalog = _open(ctx, config_file, state_dir)
    echo_json(models_ops.get_model(open_appliance(config, catalog), local_operator(), name).to_json())


@models.command("rm")
@config_options
@click.argument("name")
@click.pass_context
def models_rm(ctx: click.Context, config_file: str | None, state_dir: str | None, name: str) -> None:
    """Delete a model (a running daemon unloads it at its next use or via the API)."""
    config, catalog = _open(ctx, config_file, state_dir)
    models_ops.remove_model(open_appliance(config, catalog), local_operator(), name)
    click.echo(f"removed {name}")


@cli.command("export")
@config_options
@click.argument("model")
@click.option("--to", "targets", multiple=True, required=True, metavar="FORMAT:TYPE",
              help="gguf:f16|q8_0|q6_k|q5_k_m|q4_k_m|q4_0|iq4_xs|..., onnx:fp32|fp16|int8; repeat or comma-separate.")
@click.option("--imatrix", default="", metavar="SOURCE",
              help="Importance matrix for quantization: builtin, dataset:NAME[:N], or a llama.cpp imatrix file.")
@click.option("--base-gguf", default="", metavar="MODEL",
              help="For a peft adapter: the GGUF model to serve it on (default: its base's best GGUF export).")
@click.option("--detach", is_flag=True)
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def export(ctx: click.Context, config_file: str | None, state_dir: str | None, model: str, targets: tuple[str, ...],
           imatrix: str, base_gguf: str, detach: bool, as_json: bool) -> None:
    """Convert MODEL to artifacts, each gated on parity with its source and signed.

    A Hugging Face model goes to gguf:TYPE and onnx:PRECISION, served as MODEL:TYPE and
    MODEL:onnx-PRECISION. A peft adapter goes to gguf:lora (served on a GGUF export of its
    base, sharing it in memory) and hf:merged (a full model, which can be exported in turn).
    """
    spec = ",".join(targets)
    submit_job(ctx, config_file, state_dir, "export",
               {"model": model, "to": spec, "imatrix": imatrix, "base_gguf": base_gguf}, detach=detach,
               as_json=as_json)


@cli.command("finetune")
@config_options
@click.argument("model")
@click.argument("dataset")
@click.option("--validation", default="", metavar="DATASET", help="Validation dataset (default: a held-out 10%).")
@click.option("--epochs", "n_epochs", default="auto", show_default=True, help="n_epochs, or auto.")
@click.option("--batch-size", default="auto", show_default=True, help="batch_size, or auto.")
@click.option("--lr-mult", "lr_mult", default="auto", show_default=True,
              help="learning_rate_multiplier: x 2e-4 for LoRA, x 2e-5 for full fine-tuning.")
@click.option("--method", type=click.Choice(["lora", "full"]), default="lora", show_default=True)
@click.option("--lora-r", type=int, default=16, show_default=True)
@click.option("--max-steps", type=int, default=0, help="Stop after this many steps (0: the epochs decide).")
@click.option("--max-seq-len", type=int, default=2048, show_default=True)
@click.option("--checkpoint-every", type=int, default=50, show_default=True)
@click.option("--micro-batch-size", type=int, default=0,
              help="Examples per forward pass (0: the batch size); less memory, same results.")
@click.option("--gradient-checkpointing", is_flag=True, help="Recompute activations: less memory, slower.")
@click.option("--seed", type=int, default=42, show_default=True)
@click.option("--suffix", default="", help="The result is named MODEL-ft-SUFFIX.")
@click.option("--export", "export_targets", default="", metavar="TARGETS",
              help="Also export the merged model, e.g. gguf:q4_k_m,gguf:q8_0,onnx:int8 (parity-gated).")
@click.option("--detach", is_flag=True)
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def finetune(ctx: click.Context, config_file: str | None, state_dir: str | None, model: str, dataset: str,
             validation: str, n_epochs: str, batch_size: str, lr_mult: str, method: str, lora_r: int,
             max_steps: int, max_seq_len: int, checkpoint_every: int, micro_batch_size: int,
             gradient_checkpointing: bool, seed: int, suffix: str, export_targets: str, detach: bool,
             as_json: bool) -> None:
    """Fine-tune MODEL on DATASET (NAME, NAME:N or a file id); the progress bar shows step, loss and ETA.

    The result is served at once as MODEL-ft-SUFFIX:lora (its LoRA on the base's GGUF export).
    """
    def number(name: str, raw: str) -> Any:
        if raw == "auto":
            return raw
        try:
            return float(raw) if name == "learning_rate_multiplier" else int(raw)
        except ValueError:
            raise InvalidRequest(f"--{name.replace('_', '-')} must be a number or auto", param=name) from None

    hyper = {"n_epochs": number("n_epochs", n_epochs), "batch_size": number("batch_size", batch_size),
             "learning_rate_multiplier": number("learning_rate_multiplier", lr_mult)}
    params = {"model": model, "training_file": dataset, "validation_file": validation,
              "hyperparameters": json.dumps(hyper), "method": method, "lora_r": lora_r, "max_steps": max_steps,
              "max_seq_len": max_seq_len, "checkpoint_every": checkpoint_every, "seed": seed, "suffix": suffix,
              "export": export_targets, "micro_batch_size": micro_batch_size,
              "gradient_checkpointing": gradient_checkpointing}
    submit_job(ctx, config_file, state_dir, "finetune", params, detach=detach, as_json=as_json)


@cli.command("prune")
@config_options
@click.argument("model")
@click.option("--depth", default="", metavar="N|PCT%", help="Decoder blocks to remove (e.g. 2 or 25%).")
@click.option("--width", default="", metavar="N|PCT%", help="MLP intermediate channels to remove (e.g. 25%).")
@click.option("--heads", default="", metavar="N|PCT%",
              help="Attention query heads to remove, the same from every key/value group (or whole groups).")
@click.option("--hidden", default="", metavar="N|PCT%",
              help="Embedding channels (hidden size) to remove; also shrinks the output layer.")
@click.option("--calibration", default="", metavar="DATASET",
              help="Rank on this dataset's training split (default: built-in text).")
@click.option("--calibration-tokens", type=int, default=32768, show_default=True)
@click.option("--eval", "eval_dataset", default="", metavar="DATASET",
              help="Evaluate source and result on this dataset's held-out records (default: the calibration's).")
@click.option("--suffix", default="", help="The result is named MODEL-pruned-SUFFIX.")
@click.option("--export", "export_targets", default="", metavar="TARGETS",
              help="Also export the result, e.g. gguf:q4_k_m,onnx:int8 (parity-gated).")
@click.option("--detach", is_flag=True)
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def prune(ctx: click.Context, config_file: str | None, state_dir: str | None, model: str, depth: str, width: str,
          heads: str, hidden: str, calibration: str, calibration_tokens: int, eval_dataset: str, suffix: str,
          export_targets: str, detach: bool, as_json: bool) -> None:
    """Make MODEL smaller: remove whole decoder blocks, MLP channels, attention heads and/or embedding channels,
    ranked on calibration data.

    The result is an ordinary Hugging Face model (export, serve, fine-tune or distill it); heal it
    with `garrison distill MODEL RESULT DATASET`.
    """
    params = {"model": model, "depth": depth, "width": width, "heads": heads, "hidden": hidden,
              "calibration": calibration,
              "calibration_tokens": calibration_tokens, "eval": eval_dataset, "suffix": suffix,
              "export": export_targets}
    submit_job(ctx, config_file, state_dir, "prune", params, detach=detach, as_json=as_json)


@cli.command("distill")
@config_options
@click.argument("teacher")
@click.argument("student")
@click.argument("dataset")
@click.option("--method", type=click.Choice(["full", "lora"]), default="full", show_default=True)
@click.option("--lora-r", type=int, default=16, show_default=True)
@click.option("--epochs", "n_epochs", default="auto", show_default=True, help="n_epochs, or auto.")
@click.option("--batch-size", default="auto", show_default=True, help="batch_size, or auto.")
@click.option("--lr-mult", "lr_mult", default="auto", show_default=True, help="learning_rate_multiplier, or auto.")
@click.option("--top-k", type=int, default=16, show_default=True, help="Teacher log-probabilities kept per token.")
@click.option("--ce-weight", type=float, default=0.5, show_default=True, help="Weight of the cross-entropy term.")
@click.option("--max-steps", type=int, default=0, help="Stop after this many steps (0: the epochs decide).")
@click.option("--max-seq-len", type=int, default=2048, show_default=True)
@click.option("--checkpoint-every", type=int, default=50, show_default=True)
@click.option("--seed", type=int, default=42, show_default=True)
@click.option("--suffix", default="", help="The result is named STUDENT-distilled-SUFFIX.")
@click.option("--export", "export_targets", default="", metavar="TARGETS",
              help="Also export the result, e.g. gguf:q4_k_m,onnx:int8 (parity-gated).")
@click.option("--detach", is_flag=True)
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def distill(ctx: click.Context, config_file: str | None, state_dir: str | None, teacher: str, student: str,
            dataset: str, method: str, lora_r: int, n_epochs: str, batch_size: str, lr_mult: str, top_k: int,
            ce_weight: float, max_steps: int, max_seq_len: int, checkpoint_every: int, seed: int, suffix: str,
            export_targets: str, detach: bool, as_json: bool) -> None:
    """Train STUDENT towards TEACHER's next-token distributions on DATASET (heals a pruned model).

    Teacher and student must share a tokenizer. Resumable like fine-tuning; the result,
    STUDENT-distilled-SUFFIX, is evaluated beside teacher and student at the end.
    """
    hyper: dict[str, Any] = {}
    for name, raw in (("n_epochs", n_epochs), ("batch_size", batch_size), ("learning_rate_multiplier", lr_mult)):
        if raw != "auto":
            try:
                hyper[name] = float(raw) if name == "learning_rate_multiplier" else int(raw)
            except ValueError:
                raise InvalidRequest(f"--{name.replace('_', '-')} must be a number or auto", param=name) from None
    params = {"teacher": teacher, "student": student, "dataset": dataset, "method": method, "lora_r": lora_r,
              "hyperparameters": json.dumps(hyper), "top_k": top_k, "ce_weight": ce_weight, "max_steps": max_steps,
              "max_seq_len": max_seq_len, "checkpoint_every": checkpoint_every, "seed": seed, "suffix": suffix,
              "export": export_targets}
    submit_job(ctx, config_file, state_dir, "distill", params, detach=detach, as_json=as_json)


@cli.command("eval")
@config_options
@click.argument("models", nargs=-1, required=True)
@click.option("--dataset", required=True, metavar="NAME[:N]", help="The dataset version whose held-out records "
              "are scored.")
@click.option("--max-new-tokens", type=int, default=64, show_default=True,
              help="Longest greedy answer (0: perplexity only).")
@click.option("--max-records", type=int, default=0, help="Score at most this many held-out records (0: all).")
@click.option("--detach", is_flag=True)
@click.option("--json", "as_json", is_flag=True, help="Print the evaluation as JSON.")
@click.pass_context
def eval_command(ctx: click.Context, config_file: str | None, state_dir: str | None, models: tuple[str, ...],
                 dataset: str, max_new_tokens: int, max_records: int, detach: bool, as_json: bool) -> None:
    """Score MODELS side by side on DATASET's held-out records (none a compared model trained on).

    Any registered model: Hugging Face, peft adapter, GGUF (and GGUF LoRA), ONNX. Prints one
    table: perplexity on assistant turns, exact match and token F1 of greedy answers, and
    accuracy and macro F1 when the answers are labels.
    """
    from garrison.operations import evaluations as eval_ops

    config, catalog = _open(ctx, config_file, state_dir)
    app = open_appliance(config, catalog)
    who = local_operator()
    job = eval_ops.start_evaluation(app, who, list(models), dataset, max_new_tokens=max_new_tokens,
                                    max_records=max_records)
    if detach:
        echo_json(job.to_json()) if as_json else click.echo(job.id)
        return
    job = _follow(config, catalog, job)
    if job.state != "succeeded":
        _finish(job, as_json)
        return
    evaluation = eval_ops.get_evaluation(app, who, str((job.result or {})["evaluation"]))
    if as_json:
        echo_json(eval_ops.evaluation_json(evaluation))
    else:
        click.echo(evaluation.table())


@cli.group("evals")
def evals_group() -> None:
    """Stored evaluations: side-by-side tables of models scored on held-out data."""


@evals_group.command("list")
@config_options
@click.option("--model", default=None, help="Only evaluations that scored this model.")
@click.option("--dataset", default=None, help="Only evaluations on this dataset (NAME or NAME:N).")
@click.option("--limit", default=20, show_default=True)
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def evals_list(ctx: click.Context, config_file: str | None, state_dir: str | None, model: str | None,
               dataset: str | None, limit: int, as_json: bool) -> None:
    from garrison.operations import evaluations as eval_ops

    config, catalog = _open(ctx, config_file, state_dir)
    found = eval_ops.list_evaluations(open_appliance(config, catalog), local_operator(), model=model,
                                      dataset=dataset, limit=limit)
    if as_json:
        echo_json({"object": "list", "data": [eval_ops.evaluation_json(e) for e in found]})
        return
    for evaluation in found:
        click.echo(f"{evaluation.id}  {_when(evaluation.created_at)}  {evaluation.dataset}  "
                   f"{', '.join(evaluation.models)}")


@evals_group.command("show")
@config_options
@click.argument("evaluation_id")
@click.option("--json", "as_json", is_flag=True, help="The evaluation as JSON (split, metrics, lineage).")
@click.pass_context
def evals_show(ctx: click.Context, config_file: str | None, state_dir: str | None, evaluation_id: str,
               as_json: bool) -> None:
    from garrison.operations import evaluations as eval_ops

    config, catalog = _open(ctx, config_file, state_dir)
    evaluation = eval_ops.get_evaluation(open_appliance(config, catalog), local_operator(), evaluation_id)
    if as_json:
        echo_json(eval_ops.evaluation_json(evaluation))
    else:
        click.echo(evaluation.table())


# -- inference through the daemon ------------------------------------------------------
def _client(ctx: click.Context, config_file: str | None, state_dir: str | None, key: str | None) -> Any:
    from garrison.client import DaemonClient, api_key, daemon_url

    config = config_loader(ctx, config_file, state_dir)()
    return DaemonClient(daemon_url(config), api_key(key), ca_file=config.tls_cert_file or None)


def _sampling(max_tokens: int, temperature: float, seed: int | None) -> dict[str, Any]:
    body: dict[str, Any] = {"max_tokens": max_tokens, "temperature": temperature}
    if seed is not None:
        body["seed"] = seed
    return body


def generation_options(func: F) -> F:
    func = click.option("--key", default=None, help="API key (env GARRISON_KEY).")(func)
    func = click.option("--seed", type=int, default=None)(func)
    func = click.option("--temperature", type=float, default=0.7, show_default=True)(func)
    func = click.option("--max-tokens", type=int, default=256, show_default=True)(func)
    return func


async def _print_stream(client: Any, body: dict[str, Any]) -> str:
    pieces = []
    async for piece in client.stream_chat(body):
        pieces.append(piece)
        click.echo(piece, nl=False)
    click.echo()
    return "".join(pieces)


@cli.command("run")
@config_options
@click.argument("model")
@click.argument("prompt")
@generation_options
@click.pass_context
def run_model(ctx: click.Context, config_file: str | None, state_dir: str | None, model: str, prompt: str,
              max_tokens: int, temperature: float, seed: int | None, key: str | None) -> None:
    """Ask MODEL one question through the daemon and stream the answer."""
    client = _client(ctx, config_file, state_dir, key)
    body = {"model": model, "messages": [{"role": "user", "content": prompt}],
            **_sampling(max_tokens, temperature, seed)}
    asyncio.run(_print_stream(client, body))


@cli.command("chat")
@config_options
@click.argument("model")
@click.option("--system", "system_prompt", default=None, help="A system message to start with.")
@generation_options
@click.pass_context
def chat(ctx: click.Context, config_file: str | None, state_dir: str | None, model: str,
         system_prompt: str | None, max_tokens: int, temperature: float, seed: int | None, key: str | None) -> None:
    """Talk with MODEL through the daemon; an empty line or Ctrl-D ends. The daemon reuses the KV cache of
    earlier turns, so a long conversation does not get slower turn after turn."""
    client = _client(ctx, config_file, state_dir, key)
    messages: list[dict[str, str]] = [{"role": "system", "content": system_prompt}] if system_prompt else []
    while True:
        try:
            line = input("> ")
        except EOFError:
            click.echo()
            break
        if not line.strip():
            break
        messages.append({"role": "user", "content": line})
        answer = asyncio.run(_print_stream(client, {"model": model, "messages": messages,
                                                    **_sampling(max_tokens, temperature, seed)}))
        messages.append({"role": "assistant", "content": answer})


def _json_file(path: str | None, what: str) -> Any:
    if path is None:
        return None
    try:
        return json.loads(sys.stdin.read() if path == "-" else Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise click.BadParameter(f"{what}: {exc}") from None


@cli.command("render")
@config_options
@click.argument("model")
@click.option("--messages", "messages_file", default=None, metavar="FILE",
              help="JSON: a list of messages, or a request body with messages, tools, chat_template_kwargs "
                   "('-' reads stdin).")
@click.option("--user", "user_text", default=None, help="One user message (instead of --messages).")
@click.option("--tools", "tools_file", default=None, metavar="FILE", help="JSON list of tools (OpenAI's shape).")
@click.option("--kwarg", "kwargs", multiple=True, metavar="NAME=JSON",
              help="A chat_template_kwargs variable, e.g. enable_thinking=false (repeatable).")
@click.option("--template", "template_file", default=None, metavar="FILE",
              help="A chat template to use instead of the model's.")
@click.option("--no-generation-prompt", is_flag=True, help="Leave out the assistant turn's opening.")
@click.option("--key", default=None, help="API key (env GARRISON_KEY).")
@click.option("--json", "as_json", is_flag=True, help="The daemon's answer as JSON (prompt and token ids).")
@click.pass_context
def render(ctx: click.Context, config_file: str | None, state_dir: str | None, model: str,
           messages_file: str | None, user_text: str | None, tools_file: str | None, kwargs: tuple[str, ...],
           template_file: str | None, no_generation_prompt: bool, key: str | None, as_json: bool) -> None:
    """Show the prompt MODEL would be given for a conversation (its chat template, as transformers renders it)
    and its token count; nothing is generated."""
    loaded = _json_file(messages_file, "--messages")
    body: dict[str, Any] = dict(loaded) if isinstance(loaded, dict) else {"messages": loaded}
    if user_text is not None:
        body["messages"] = [*(body.get("messages") or []), {"role": "user", "content": user_text}]
    if body.get("messages") is None:
        raise click.UsageError("give --messages FILE or --user TEXT")
    if tools_file:
        body["tools"] = _json_file(tools_file, "--tools")
    extra = dict(body.get("chat_template_kwargs") or {})
    for pair in kwargs:
        name, sep, raw = pair.partition("=")
        if not sep:
            raise click.BadParameter(f"{pair!r}: expected NAME=JSON", param_hint="--kwarg")
        try:
            extra[name] = json.loads(raw)
        except ValueError:
            extra[name] = raw  # a bare word is a string
    if extra:
        body["chat_template_kwargs"] = extra
    if template_file:
        body["chat_template"] = Path(template_file).read_text(encoding="utf-8")
    if no_generation_prompt:
        body["add_generation_prompt"] = False
    data = asyncio.run(_client(ctx, config_file, state_dir, key).request(
        "POST", "/v1/garrison/render", {**body, "model": model}))
    if as_json:
        click.echo(json.dumps(data, indent=2, ensure_ascii=False))
        return
    click.echo(data["prompt"], nl=False)
    click.echo(f"\n-- {data['tokens']} tokens", err=True)


def _size(n: int | None) -> str:
    return "-" if not n else f"{n / (1 << 20):.0f} MiB"


@cli.command("ps")
@config_options
@click.option("--key", default=None, help="API key (env GARRISON_KEY).")
@click.option("--json", "as_json", is_flag=True, help="The daemon's answer as JSON.")
@click.pass_context
def ps(ctx: click.Context, config_file: str | None, state_dir: str | None, key: str | None, as_json: bool) -> None:
    """Loaded models and their runner processes: pid, backend and CPU variant, device, memory, busy slots,
    idle-until and crashes; failed models with their reason; the CPU-kernel verdicts of this machine."""
    data = asyncio.run(_client(ctx, config_file, state_dir, key).request("GET", "/v1/garrison/runners"))
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    click.echo(f"{'MODEL':24} {'STATE':10} {'PID':>7} {'BACKEND':10} {'VARIANT':16} {'DEVICE':6} {'REPACK':6} "
               f"{'MEMORY':>9} {'SLOTS':>5} {'IDLE UNTIL':10} LAST CRASH")
    for r in data["data"]:
        slots = f"{r.get('slots_busy', 0)}/{r.get('slots', 0)}" if r["state"] == "ready" else "-"
        idle = _when(r["idle_until"])[11:19] if r.get("idle_until") else "-"
        repack = ("on" if r.get("extra_bufts") else "off") if r["state"] == "ready" else "-"
        click.echo(f"{r['model']:24} {r['state']:10} {r.get('pid') or '-':>7} {r.get('backend', '-'):10} "
                   f"{r.get('variant', '-'):16} {r.get('device', '-'):6} {repack:6} "
                   f"{_size(r.get('memory_bytes')):>9} {slots:>5} {idle:10} {r.get('last_crash') or '-'}")
        if r.get("failed_reason"):
            click.echo(f"  failed: {r['failed_reason']}")
    kernels = data["cpu_kernels"]
    click.echo(f"cpu_repack = {kernels['cpu_repack']}; {len(kernels['variants'])} CPU variant libraries")
    for v in kernels["verdicts"]:
        click.echo(f"  {v['type']:8} extra buffer types {'on ' if v['extra_bufts'] else 'off'} "
                   f"({v['variant']}): {v['reason']}")


@cli.command("stop")
@config_options
@click.argument("model")
@click.option("--key", default=None, help="API key (env GARRISON_KEY).")
@click.pass_context
def stop_model(ctx: click.Context, config_file: str | None, state_dir: str | None, model: str,
               key: str | None) -> None:
    """Unload MODEL now: its runner process ends and its memory returns to the OS (also clears a failed model)."""
    asyncio.run(_client(ctx, config_file, state_dir, key).request("DELETE", f"/v1/garrison/runners/{model}"))
    click.echo(f"stopped {model}")


@cli.group("tls")
def tls_group() -> None:
    """HTTPS for a daemon that listens beyond this machine."""


@tls_group.command("new-cert")
@click.option("--cert", "cert_file", required=True, type=click.Path(dir_okay=False), help="Certificate to write.")
@click.option("--key", "key_file", required=True, type=click.Path(dir_okay=False), help="Private key (mode 0600).")
@click.option("--host", "hosts", multiple=True, help="Another name or address clients use (repeatable).")
def tls_new_cert(cert_file: str, key_file: str, hosts: tuple[str, ...]) -> None:
    """Make a self-signed certificate for this host (its name, localhost, --host ...) and print its
    SHA-256 fingerprint; point tls_cert_file / tls_key_file at them, and give clients the certificate
    as their CA file (the `openai` client: an http_client whose verify trusts CERT)."""
    from pathlib import Path

    from garrison.daemon.tls import new_self_signed

    print_ = new_self_signed(Path(cert_file), Path(key_file), list(hosts))
    click.echo(f"wrote {cert_file} and {key_file}; SHA-256 fingerprint {print_}")


# -- audit -------------------------------------------------------------------------
@cli.group("audit", invoke_without_command=True)
@config_options
@click.option("--limit", default=50, show_default=True, help="How many of the latest entries to show.")
@click.pass_context
def audit(ctx: click.Context, config_file: str | None, state_dir: str | None, limit: int) -> None:
    """Show the latest audit entries and verify the whole trail (exit 8 if broken; see `audit verify`)."""
    if ctx.invoked_subcommand is not None:
        return
    from garrison.policies.audit import verify_trail
    from garrison.policies.audit_keys import AuditKeys

    config, catalog = _open(ctx, config_file, state_dir)
    rows = catalog.query("SELECT * FROM (SELECT * FROM audit ORDER BY seq DESC LIMIT ?) ORDER BY seq", (limit,))
    for r in rows:
        click.echo(f"{r['seq']:6} {_when(r['at'])} {r['actor']:24} {r['action']:16} {r['resource']:24} "
                   f"{r['outcome']}")
    report = verify_trail(catalog, AuditKeys(config).verifying())
    report.raise_if_broken()
    click.echo(f"chain intact ({report.entries} entries)")


@audit.command("verify")
@config_options
@click.option("--anchors", "anchor_files", multiple=True, type=click.Path(dir_okay=False, exists=True),
              help="Another anchor file to check against, e.g. the journal's copy "
                   "(`journalctl -t garrison-audit -o cat > FILE`); repeatable.")
@click.option("--json", "as_json", is_flag=True, help="The report as JSON (also when broken).")
@click.pass_context
def audit_verify(ctx: click.Context, config_file: str | None, state_dir: str | None, anchor_files: tuple[str, ...],
                 as_json: bool) -> None:
    """Verify the audit trail: every hash and MAC, gaps, and the catalog against the anchors kept outside it
    (state folder's audit-anchors.jsonl, --anchors). Exit 8 names the first bad entry and the kind of break
    (edited, deleted, mac_mismatch, unknown_key, unsigned, truncated, rewritten, anchor_forged)."""
    from garrison.policies.audit import verify_trail
    from garrison.policies.audit_keys import AuditKeys

    config, catalog = _open(ctx, config_file, state_dir)
    report = verify_trail(catalog, AuditKeys(config).verifying(), [Path(p) for p in anchor_files])
    if as_json:
        echo_json(report.as_dict())
    elif report.intact:
        legacy = f", {report.legacy} from before MACs" if report.legacy else ""
        anchored = f", anchored up to {report.anchored_seq}" if report.anchored_seq else ", no anchor yet"
        click.echo(f"chain intact: {report.entries} entries{legacy}, {report.macs_checked} MACs verified, "
                   f"{report.anchors} anchors matched{anchored}")
    report.raise_if_broken()


@cli.group("docs", hidden=True)
def docs_group() -> None:
    """Generate reference documentation (docs/api.md, docs/cli.md, the guide's exit codes)."""


@docs_group.command("api")
def docs_api() -> None:
    """Print the HTTP API reference generated from the OpenAPI document."""
    from garrison.daemon.openapi import build_openapi, render_markdown

    click.echo(render_markdown(build_openapi()), nl=False)


def _command_help(command: click.Command, path: list[str]) -> list[str]:
    ctx = click.Context(command, info_name=" ".join(path), max_content_width=100)
    lines = [f"## `{' '.join(path)}`", "", "```", command.get_help(ctx), "```", ""]
    if isinstance(command, click.Group):
        for name in sorted(command.list_commands(ctx)):
            sub = command.get_command(ctx, name)
            if sub is not None and not sub.hidden:
                lines += _command_help(sub, [*path, name])
    return lines


@docs_group.command("cli")
def docs_cli() -> None:
    """Print the CLI reference generated from every command's --help."""
    lines = ["# The `garrison` command", "",
             "Generated from `--help` by `garrison docs cli`; do not edit by hand.", ""]
    click.echo("\n".join(lines + _command_help(cli, ["garrison"])))


@docs_group.command("exit-codes")
def docs_exit_codes() -> None:
    """Print the exit-code table generated from the error hierarchy (docs/operator-guide.md embeds it)."""
    from garrison.exit_codes import render_markdown

    click.echo(render_markdown(), nl=False)


@docs_group.command("config")
def docs_config() -> None:
    """Print the configuration reference generated from the settings table."""
    from garrison.config import ENV_PREFIX, SETTINGS, reload_label

    lines = ["# Configuration reference", "",
             "Generated from the settings table by `garrison docs config`; do not edit by hand.", "",
             "Garrison reads `/etc/garrison/garrison.toml` (or the file named by `--config` or "
             "`GARRISON_CONFIG`), then the environment (`GARRISON_<KEY>`), then command-line flags. "
             "Unknown keys and bad values stop Garrison with exit code 2 and a message naming the key. "
             "SIGHUP reads the file (and the policy file) again: the last column says what it applies.",
             "", "| key | environment | default | meaning | on SIGHUP |", "|---|---|---|---|---|"]
    for s in SETTINGS:
        default = "(see meaning)" if s.key == "state_dir" else repr(s.default({}))
        lines.append(f"| `{s.key}` | `{ENV_PREFIX}{s.key.upper()}` | `{default}` | {s.doc} | {reload_label(s)} |")
    click.echo("\n".join(lines))


@docs_group.command("reload")
def docs_reload() -> None:
    """Print what SIGHUP applies, from the settings table (docs/operator-guide.md embeds it)."""
    from garrison.config import reload_markdown

    click.echo(reload_markdown(), nl=False)


def _register_commands() -> None:
    """Commands defined beside the code they drive (one CLI, several modules)."""
    from garrison.commands.identity import identity_command, seal_command
    from garrison.commands.ingest import datasets_group, ingest_command
    from garrison.commands.master_key import (
        backup_master_command,
        new_master_key_command,
        restore_master_command,
        rotate_master_command,
    )

    cli.add_command(identity_command)
    cli.add_command(seal_command)
    cli.add_command(datasets_group)
    cli.add_command(ingest_command)
    for command in (rotate_master_command, new_master_key_command, backup_master_command, restore_master_command):
        keys.add_command(command)


_register_commands()


def main(argv: list[str] | None = None) -> None:
    from garrison.policies import network_guard


    network_guard.install()
    try:
        cli.main(args=argv, prog_name="garrison", standalone_mode=False)
    except GarrisonError as exc:
        click.echo(f"garrison: error [{exc.code}]: {exc.message}", err=True)
        sys.exit(exit_code_for(exc))
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)


if __name__ == "__main__":
    main()
