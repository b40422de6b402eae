"""Evaluation results as catalog rows: one comparison, one row per model scored in it.

An evaluation job writes its comparison once, at its end, in one transaction (a killed job
leaves no half table); the faces read it back as one side-by-side table or as JSON. Each
row keeps the model's lineage as it stood when scored, so the table still says what a
model was after the model is removed.
"""

from __future__ import annotations

import json
import secrets
import sqlite3
import time
from dataclasses import dataclass, field
from typing import Any

from garrison.errors import NotFound
from garrison.store.catalog import Catalog

# Columns of the side-by-side table: (metric key, heading, format). A metric a row lacks shows "-".
TABLE_COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("perplexity", "ppl", "{:.3f}"),
    ("exact_match", "EM", "{:.3f}"),
    ("f1", "F1", "{:.3f}"),
    ("accuracy", "acc", "{:.3f}"),
    ("macro_f1", "macro-F1", "{:.3f}"),
    ("records", "records", "{:d}"),
    ("seconds", "s", "{:.1f}"),
)


@dataclass
class EvaluationRow:
    model: str
    format: str
    size_bytes: int | None
    metrics: dict[str, Any]
    lineage: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"model": self.model, "format": self.format, "size_bytes": self.size_bytes,
                "metrics": self.metrics, "lineage": self.lineage}


@dataclass
class Evaluation:
    id: str
    job_id: str | None
    dataset: str
    split: dict[str, Any]
    created_at: float
    created_by: str | None
    rows: list[EvaluationRow]

    @property
    def models(self) -> list[str]:
        return [row.model for row in self.rows]

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "object": "evaluation", "job_id": self.job_id, "dataset": self.dataset,
                "split": self.split, "created_at": self.created_at, "created_by": self.created_by,
                "rows": [row.to_json() for row in self.rows]}

    def table(self) -> str:
        """The comparison as one fixed-width table (the CLI's default output)."""
        head = ["model", "format", "MB"] + [title for _, title, _ in TABLE_COLUMNS]
        lines = [head]
        for row in self.rows:
            cells = [row.model, row.format, f"{row.size_bytes / 1e6:.1f}" if row.size_bytes else "-"]
            for key, _, fmt in TABLE_COLUMNS:
                value = row.metrics.get(key)
                cells.append(fmt.format(value) if isinstance(value, int | float) and value is not None else "-")
            lines.append(cells)
        widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
        text = ["  ".join(c.ljust(w) if i < 2 else c.rjust(w)
                          for i, (c, w) in enumerate(zip(line, widths, strict=True))) for line in lines]
        split = self.split
        note = (f"{self.id} on {self.dataset}: {split.get('held_out', '?')} held-out records "
                f"(split {split.get('method', '?')}, digest {str(split.get('digest', ''))[:12]})")
        return "\n".join([note, *text])


class EvaluationStore:
    def __init__(self, catalog: Catalog) -> None:
        self.catalog = catalog

    def record(self, *, dataset: str, split: dict[str, Any], rows: list[EvaluationRow], job_id: str | None,
               created_by: str | None) -> Evaluation:
        evaluation = Evaluation(id="eval_" + secrets.token_hex(8), job_id=job_id, dataset=dataset, split=split,
                                created_at=time.time(), created_by=created_by, rows=rows)
        with self.catalog.write() as conn:
            conn.execute("INSERT INTO evaluations (id, job_id, dataset, split, models, created_at, created_by) "
                         "VALUES (?, ?, ?, ?, ?, ?, ?)",
                         (evaluation.id, job_id, dataset, json.dumps(split), json.dumps(evaluation.models),
                          evaluation.created_at, created_by))
            conn.executemany(
                "INSERT INTO evaluation_rows (evaluation_id, position, model, format, size_bytes, metrics, lineage) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                [(evaluation.id, i, r.model, r.format, r.size_bytes, json.dumps(r.metrics), json.dumps(r.lineage))
                 for i, r in enumerate(rows)])
        return evaluation

    def _rows(self, evaluation_id: str) -> list[EvaluationRow]:
        return [EvaluationRow(model=r["model"], format=r["format"], size_bytes=r["size_bytes"],
                              metrics=json.loads(r["metrics"]), lineage=json.loads(r["lineage"]))
                for r in self.catalog.query("SELECT * FROM evaluation_rows WHERE evaluation_id=? ORDER BY position",
                                            (evaluation_id,))]

    def _evaluation(self, row: sqlite3.Row) -> Evaluation:
        return Evaluation(id=row["id"], job_id=row["job_id"], dataset=row["dataset"], split=json.loads(row["split"]),
                          created_at=row["created_at"], created_by=row["created_by"], rows=self._rows(row["id"]))

    def get(self, evaluation_id: str) -> Evaluation:
        row = self.catalog.query_one("SELECT * FROM evaluations WHERE id=?", (evaluation_id,))
        if row is None:
            raise NotFound(f"no evaluation {evaluation_id}", code="evaluation_not_found", param="evaluation_id")
        return self._evaluation(row)

    def for_job(self, job_id: str) -> Evaluation | None:
        row = self.catalog.query_one("SELECT * FROM evaluations WHERE job_id=? ORDER BY created_at DESC LIMIT 1",
                                     (job_id,))
        return self._evaluation(row) if row is not None else None

    def list(self, *, model: str | None = None, dataset: str | None = None, limit: int = 50) -> list[Evaluation]:
        sql = "SELECT * FROM evaluations"
        where, args = [], []
        if model:
            where.append("id IN (SELECT evaluation_id FROM evaluation_rows WHERE model=?)")
            args.append(model)
        if dataset:
            where.append("(dataset=? OR dataset LIKE ?)")
            args += [dataset, f"{dataset}:%"]
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY created_at DESC LIMIT ?"
        return [self._evaluation(r) for r in self.catalog.query(sql, (*args, limit))]
