"""Fixtures shared by the ingestion tests: an ingestion service on a developer install in tmp_path."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from garrison.config import load_config
from garrison.ingest.pipeline import IngestService
from garrison.paths import StateLayout
from garrison.store.catalog import Catalog


@pytest.fixture
def service(env: dict[str, str]) -> Iterator[IngestService]:
    config = load_config()
    layout = StateLayout(config.state_path)
    layout.ensure()
    catalog = Catalog(layout.catalog)
    yield IngestService(config, catalog, chunk_size=4096)
    catalog.close()
