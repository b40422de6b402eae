"""Per-key usage: batched writes to a real catalog, and the report the CLI and the API share."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest

from garrison.errors import InvalidRequest, NotFound
from garrison.operations.usage import UsageRecorder, parse_since, usage_report
from garrison.policies.keys import KeyStore
from garrison.store.catalog import Catalog

DAY0 = 1_700_006_400.0  # 2023-11-15T00:00:00Z


class Clock:
    def __init__(self) -> None:
        self.now = DAY0 + 10 * 3600 + 120  # 10:02 UTC

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def catalog(tmp_path: Path) -> Catalog:
    return Catalog(tmp_path / "catalog.db")


def test_counts_gather_in_memory_and_land_in_one_row_per_key_model_and_hour(catalog: Catalog) -> None:
    clock = Clock()
    key, _ = KeyStore(catalog).create("infer", name="bot")
    recorder = UsageRecorder(catalog, clock)
    for _ in range(100):
        recorder.add(key.id, "tiny", 10, 5)
    assert catalog.query("SELECT COUNT(*) FROM key_usage")[0][0] == 0  # nothing written on the hot path
    assert recorder.flush() == 1
    assert recorder.flush() == 0
    recorder.add(key.id, "tiny", 1, 1)  # same hour: added to the row
    clock.now += 3600  # the next hour: a row of its own
    recorder.add(key.id, "tiny", 2, 3)
    recorder.add(key.id, "other", 4, 0)
    assert recorder.flush() == 3
    rows = catalog.query("SELECT model, hour, requests, prompt_tokens, completion_tokens FROM key_usage "
                         "ORDER BY hour, model")
    assert [tuple(r) for r in rows] == [("tiny", DAY0 + 36000, 101, 1001, 501), ("other", DAY0 + 39600, 1, 4, 0),
                                        ("tiny", DAY0 + 39600, 1, 2, 3)]

    report = usage_report(catalog, now=clock.now)
    assert [(r["key_name"], r["model"], r["requests"], r["total_tokens"]) for r in report["data"]] == [
        ("bot", "other", 1, 4), ("bot", "tiny", 102, 1507)]
    assert report["totals"] == {"requests": 103, "prompt_tokens": 1007, "completion_tokens": 504,
                                "total_tokens": 1511}
    assert usage_report(catalog, by="key", now=clock.now)["data"][0]["requests"] == 103
    hours = usage_report(catalog, by="hour", now=clock.now)["data"]
    assert [(r["model"], r["hour"]) for r in hours] == [("other", "2023-11-15T11:00:00Z"),
                                                        ("tiny", "2023-11-15T10:00:00Z"),
                                                        ("tiny", "2023-11-15T11:00:00Z")]
    assert usage_report(catalog, by="day", now=clock.now)["data"][1]["day"] == "2023-11-15T00:00:00Z"
    recent = usage_report(catalog, since="30m", now=clock.now)  # 10:32: from 10:00, the hour it falls in
    assert recent["since"] == "2023-11-15T10:00:00Z" and recent["totals"]["requests"] == 103
    assert usage_report(catalog, since="2023-11-15T11:00", now=clock.now)["totals"]["requests"] == 2
    assert usage_report(catalog, since="2023-11-16", now=clock.now)["data"] == []
    with pytest.raises(NotFound):
        usage_report(catalog, key_id="key_0000000000000000")
    with pytest.raises(InvalidRequest):
        usage_report(catalog, by="week")


def test_a_failed_flush_keeps_its_batch(catalog: Catalog) -> None:
    recorder = UsageRecorder(catalog, Clock())
    recorder.add("key_a", "tiny", 10, 5)
    catalog.conn.execute("ALTER TABLE key_usage RENAME TO key_usage_away")
    with pytest.raises(sqlite3.Error):
        recorder.flush()
    recorder.add("key_a", "tiny", 1, 1)
    catalog.conn.execute("ALTER TABLE key_usage_away RENAME TO key_usage")
    assert recorder.flush() == 1
    assert tuple(catalog.query("SELECT requests, prompt_tokens, completion_tokens FROM key_usage")[0]) == (2, 11, 6)


def test_run_flushes_periodically_and_once_more_when_stopped(catalog: Catalog) -> None:
    recorder = UsageRecorder(catalog, Clock())

    async def scenario() -> None:
        stop = asyncio.Event()
        task = asyncio.create_task(recorder.run(stop, every_s=0.05))
        recorder.add("key_a", "tiny", 1, 1)
        for _ in range(200):
            await asyncio.sleep(0.02)
            if catalog.query("SELECT requests FROM key_usage"):
                break
        assert catalog.query("SELECT requests FROM key_usage")[0][0] == 1
        recorder.add("key_a", "tiny", 1, 1)
        stop.set()
        await task

    asyncio.run(scenario())
    assert catalog.query("SELECT requests FROM key_usage")[0][0] == 2


@pytest.mark.parametrize(("text", "ago"), [("90m", 5400), ("12h", 43200), ("7d", 604800), ("2w", 1209600)])
def test_since_reads_durations_back_from_now(text: str, ago: int) -> None:
    assert parse_since(text, now=DAY0) == DAY0 - ago


def test_since_all_dates_and_mistakes() -> None:
    assert parse_since(None) is None and parse_since("all") is None and parse_since(" ") is None
    assert parse_since("2023-11-15") == DAY0
    assert parse_since("2023-11-15T01:00:00+01:00") == DAY0
    with pytest.raises(InvalidRequest) as caught:
        parse_since("yesterday")
    assert caught.value.code == "invalid_since"
