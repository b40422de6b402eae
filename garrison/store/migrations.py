"""The catalog's schema as small, ordered, named migrations.

Each migration runs in its own transaction together with the record that it ran
(sqlite-utils' `Migrations`), so a crash mid-migration leaves the old schema. A new
table or column is a new function at the end of this file; never edit an applied one.
"""

from __future__ import annotations

from sqlite_utils import Database
from sqlite_utils.migrations import Migrations

MIGRATIONS = Migrations("garrison")


@MIGRATIONS()
def m001_jobs(db: Database) -> None:
    db.execute(
        """
        CREATE TABLE jobs (
            id TEXT PRIMARY KEY,
            kind TEXT NOT NULL,
            params TEXT NOT NULL DEFAULT '{}',
            state TEXT NOT NULL CHECK (state IN ('queued','running','succeeded','failed','cancelled')),
            attempts INTEGER NOT NULL DEFAULT 0,
            max_attempts INTEGER NOT NULL DEFAULT 3,
            timeout_s REAL NOT NULL,
            created_at REAL NOT NULL,
            updated_at REAL NOT NULL,
            started_at REAL,
            finished_at REAL,
            heartbeat_at REAL,
            worker_pid INTEGER,
            worker_token TEXT,
            cancel_requested INTEGER NOT NULL DEFAULT 0,
            run_after REAL NOT NULL DEFAULT 0,
            resumable INTEGER NOT NULL DEFAULT 0,
            progress REAL NOT NULL DEFAULT 0,
            progress_message TEXT NOT NULL DEFAULT '',
            progress_total REAL,
            progress_done REAL,
            log_tail TEXT NOT NULL DEFAULT '',
            checkpoint TEXT,
            result TEXT,
            error_code TEXT,
            error_message TEXT,
            created_by TEXT
        )
        """
    )
    db.execute("CREATE INDEX jobs_state ON jobs(state, created_at)")
    db.execute(
        """
        CREATE TABLE job_events (
            seq INTEGER PRIMARY KEY AUTOINCREMENT,
            job_id TEXT NOT NULL REFERENCES jobs(id) ON DELETE CASCADE,
            at REAL NOT NULL,
            level TEXT NOT NULL DEFAULT 'info',
            type TEXT NOT NULL,
            message TEXT NOT NULL DEFAULT '',
            data TEXT NOT NULL DEFAULT '{}'
        )
        """
    )
    db.execute("CREATE INDEX job_events_job ON job_events(job_id, seq)")


@MIGRATIONS()
def m002_api_keys(db: Database) -> None:
    db.execute(
        """
        CREATE TABLE api_keys (
            id TEXT PRIMARY KEY,
            name TEXT NOT NULL DEFAULT '',
            hash TEXT NOT NULL UNIQUE,
            display_prefix TEXT NOT NULL,
            role TEXT NOT NULL,
            models TEXT,
            datasets TEXT,
            created_at REAL NOT NULL,
            expires_at REAL,
            revoked_at REAL,
            last_used_at REAL
        )
        """
    )


@MIGRATIONS()
def m003_audit(db: Database) -> None:
    # Each row's hash covers the previous row's hash: editing or deleting a row
    # breaks the chain from there on (verified by `garrison audit verify`).
    db.execute(
        """
        CREATE TABLE audit (
            seq INTEGER PRIMARY KEY AUTOINCREMENT,
            at REAL NOT NULL,
            actor TEXT NOT NULL,
            action TEXT NOT NULL,
            resource TEXT NOT NULL DEFAULT '',
            outcome TEXT NOT NULL,
            detail TEXT NOT NULL DEFAULT '{}',
            prev_hash TEXT NOT NULL,
            hash TEXT NOT NULL
        )
        """
    )


@MIGRATIONS()
def m004_models(db: Database) -> None:
    db.execute(
        """
        CREATE TABLE models (
            name TEXT PRIMARY KEY,
            format TEXT NOT NULL CHECK (format IN ('gguf','hf','onnx','lora','peft')),
            folder TEXT NOT NULL,
            entry TEXT NOT NULL,
            settings TEXT NOT NULL DEFAULT '{}',
            manifest TEXT NOT NULL,
            size_bytes INTEGER NOT NULL,
            created_at REAL NOT NULL,
            created_by TEXT
        )
        """
    )


@MIGRATIONS()
def m005_datasets(db: Database) -> None:
    # Datasets and their versions (garrison.ingest.datasets). A version's records live in
    # vault/<version id>/, encrypted under its own data key; `wrapped_key` is that key
    # wrapped by the master key (NULL once the version is shredded: the row stays as a
    # tombstone so lineage can still name it). `source_sha256` makes a retried delivery
    # of the same sealed bytes idempotent. `files` backs OpenAI's /v1/files: each upload
    # is also a dataset version.
    db.execute(
        """
        CREATE TABLE datasets (
            id TEXT PRIMARY KEY,
            name TEXT NOT NULL UNIQUE,
            created_at REAL NOT NULL,
            created_by TEXT,
            deleted_at REAL
        )
        """
    )
    db.execute(
        """
        CREATE TABLE dataset_versions (
            id TEXT PRIMARY KEY,
            dataset_id TEXT NOT NULL REFERENCES datasets(id),
            version INTEGER NOT NULL,
            state TEXT NOT NULL CHECK (state IN ('ready','deleted','expired')),
            format TEXT NOT NULL,
            wrapped_key BLOB,
            record_count INTEGER NOT NULL,
            chunk_count INTEGER NOT NULL,
            plaintext_bytes INTEGER NOT NULL,
            stored_bytes INTEGER NOT NULL,
            source TEXT NOT NULL,
            source_name TEXT NOT NULL DEFAULT '',
            source_sha256 TEXT NOT NULL DEFAULT '',
            report TEXT NOT NULL DEFAULT '{}',
            created_at REAL NOT NULL,
            created_by TEXT,
            expires_at REAL,
            deleted_at REAL,
            UNIQUE (dataset_id, version)
        )
        """
    )
    db.execute("CREATE INDEX dataset_versions_state ON dataset_versions(state, expires_at)")
    db.execute("CREATE INDEX dataset_versions_source ON dataset_versions(dataset_id, source_sha256)")
    db.execute(
        """
        CREATE TABLE files (
            id TEXT PRIMARY KEY,
            filename TEXT NOT NULL,
            purpose TEXT NOT NULL,
            bytes INTEGER NOT NULL,
            created_at REAL NOT NULL,
            created_by TEXT,
            version_id TEXT REFERENCES dataset_versions(id),
            status TEXT NOT NULL CHECK (status IN ('processed','deleted')),
            deleted_at REAL
        )
        """
    )


@MIGRATIONS()
def m006_key_custody(db: Database) -> None:
    # The master key's custody (garrison.store.master_key, garrison.operations.master_key).
    # `master_key_state` keeps the check value (an HMAC of a constant under the master key: it
    # identifies the key without revealing it) of the key every wrapped key is wrapped with; a
    # process about to wrap a key checks it inside the same transaction, so nothing is ever
    # wrapped under a key the catalog has rotated away from. `key_rotations` is the rotation's
    # journal: prepared -> committed -> installed -> finished (or rolled_back / failed).
    # `wrapped_keys` holds the other keys wrapped by the master key (a fine-tune's checkpoint
    # key, ...), which a rotation rewraps with the dataset keys.
    db.execute(
        """
        CREATE TABLE master_key_state (
            id INTEGER PRIMARY KEY CHECK (id = 1),
            kcv TEXT NOT NULL,
            updated_at REAL NOT NULL
        )
        """
    )
    db.execute(
        """
        CREATE TABLE key_rotations (
            id TEXT PRIMARY KEY,
            state TEXT NOT NULL CHECK (state IN ('prepared','committed','installed','finished','rolled_back',
                                                 'failed')),
            old_kcv TEXT NOT NULL,
            new_kcv TEXT NOT NULL,
            started_at REAL NOT NULL,
            updated_at REAL NOT NULL,
            actor TEXT,
            detail TEXT NOT NULL DEFAULT '{}'
        )
        """
    )
    db.execute(
        """
        CREATE TABLE wrapped_keys (
            purpose TEXT NOT NULL,
            id TEXT NOT NULL,
            wrapped BLOB NOT NULL,
            created_at REAL NOT NULL,
            PRIMARY KEY (purpose, id)
        )
        """
    )


@MIGRATIONS()
def m007_audit_macs(db: Database) -> None:
    # The audit chain MACed under a key derived from the master key (garrison.policies.audit): `kcv`
    # names the master key (its check value), `mac` the entry's HMAC. Entries from before stay NULL:
    # a legacy prefix that the first MACed entry vouches for (a migration has no key to MAC them).
    db.execute("ALTER TABLE audit ADD COLUMN kcv TEXT")
    db.execute("ALTER TABLE audit ADD COLUMN mac TEXT")

@MIGRATIONS()
def m008_key_usage(db: Database) -> None:
    # Token usage per key, model and UTC hour (garrison.operations.usage): the daemon adds to a row
    # in batches, every few seconds and at shutdown, never once per request. `hour` is the Unix time
    # of the hour's start. No foreign key to api_keys: keys are revoked, never deleted, and the
    # usage of a key stays readable whatever becomes of it.
    db.execute(
        """
        CREATE TABLE key_usage (
            key_id TEXT NOT NULL,
            model TEXT NOT NULL,
            hour INTEGER NOT NULL,
            requests INTEGER NOT NULL DEFAULT 0,
            prompt_tokens INTEGER NOT NULL DEFAULT 0,
            completion_tokens INTEGER NOT NULL DEFAULT 0,
            PRIMARY KEY (key_id, model, hour)
        ) WITHOUT ROWID
        """
    )
    db.execute("CREATE INDEX key_usage_hour ON key_usage(hour)")


@MIGRATIONS()
def m009_job_resources(db: Database) -> None:
    # The models and datasets a job reaches (its parameters resolved at submission: file ids to
    # their datasets, `dataset:NAME` inside parameters, an adapter's base), so listing and reading
    # jobs shows a key only the jobs it is granted every resource of, without resolving again.
    db.execute("ALTER TABLE jobs ADD COLUMN resources TEXT NOT NULL DEFAULT '[]'")


@MIGRATIONS()
def m010_console_sessions(db: Database) -> None:
    # Web console sessions (garrison.daemon.console.sessions): an API key exchanged for a random
    # session id kept in an HttpOnly cookie; only its SHA-256 is stored, so a copy of the catalog
    # signs nobody in. A session acts as its key (`key_id`) and ends at `expires_at`, at sign-out, or
    # when the key is revoked or expires. In the catalog, so a restart signs nobody out.
    db.execute(
        """
        CREATE TABLE console_sessions (
            id_hash TEXT PRIMARY KEY,
            key_id TEXT NOT NULL,
            created_at REAL NOT NULL,
            expires_at REAL NOT NULL,
            user_agent TEXT NOT NULL DEFAULT ''
        ) WITHOUT ROWID
        """
    )
    db.execute("CREATE INDEX console_sessions_expiry ON console_sessions(expires_at)")


@MIGRATIONS()
def m011_evaluations(db: Database) -> None:
    # Evaluation results (garrison.models.evaluations): one `evaluations` row per comparison (the
    # dataset version, its held-out split as recorded, the job that scored it) and one
    # `evaluation_rows` row per model scored in it, so a comparison reads back as one side-by-side
    # table. Metrics and lineage are JSON: new metrics need no migration.
    db.execute(
        """
        CREATE TABLE evaluations (
            id TEXT PRIMARY KEY,
            job_id TEXT,
            dataset TEXT NOT NULL,
            split TEXT NOT NULL DEFAULT '{}',
            models TEXT NOT NULL DEFAULT '[]',
            created_at REAL NOT NULL,
            created_by TEXT
        )
        """
    )
    db.execute("CREATE INDEX evaluations_created ON evaluations(created_at)")
    db.execute(
        """
        CREATE TABLE evaluation_rows (
            evaluation_id TEXT NOT NULL REFERENCES evaluations(id) ON DELETE CASCADE,
            position INTEGER NOT NULL,
            model TEXT NOT NULL,
            format TEXT NOT NULL,
            size_bytes INTEGER,
            metrics TEXT NOT NULL DEFAULT '{}',
            lineage TEXT NOT NULL DEFAULT '{}',
            PRIMARY KEY (evaluation_id, model)
        ) WITHOUT ROWID
        """
    )
    db.execute("CREATE INDEX evaluation_rows_model ON evaluation_rows(model)")


@MIGRATIONS()
def m012_responses(db: Database) -> None:
    # Stored responses of the Responses API (garrison.operations.stored_responses): the body sealed with
    # a key of its own wrapped by the master key (`wrapped_keys`, purpose "response"); who made it and
    # when are plain, for grants and retention.
    db.execute(
        """
        CREATE TABLE responses (
            id TEXT PRIMARY KEY,
            key_id TEXT NOT NULL,
            model TEXT NOT NULL,
            created_at REAL NOT NULL,
            body BLOB NOT NULL
        )
        """
    )
    db.execute("CREATE INDEX responses_created ON responses(created_at)")
