"""What an operation works on: the catalog and the stores over it, whichever face calls.

The daemon's `DaemonState` has these attributes already; the CLI opens them with
`open_appliance`. Operations take an `Appliance` and a `Principal` and nothing else, so the
HTTP routes and the commands cannot differ in what they check.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from garrison.config import Config
from garrison.jobs.store import JobStore
from garrison.models.registry import ModelRegistry
from garrison.paths import StateLayout
from garrison.policies.keys import KeyStore
from garrison.store.catalog import Catalog


class Appliance(Protocol):
    @property
    def config(self) -> Config: ...

    @property
    def catalog(self) -> Catalog: ...

    @property
    def jobs(self) -> JobStore: ...

    @property
    def models(self) -> ModelRegistry: ...

    @property
    def keys(self) -> KeyStore: ...


@dataclass
class LocalAppliance:
    """The stores of one state folder, for a command run on the machine."""

    config: Config
    catalog: Catalog
    jobs: JobStore
    models: ModelRegistry
    keys: KeyStore


def open_appliance(config: Config, catalog: Catalog | None = None) -> LocalAppliance:
    from garrison.crypto.identity import IdentityCache

    catalog = catalog or Catalog(StateLayout(config.state_path).catalog)
    identities = IdentityCache()
    registry = ModelRegistry(catalog, StateLayout(config.state_path), signer=lambda: identities.get(config))
    return LocalAppliance(config=config, catalog=catalog, jobs=JobStore(catalog), models=registry,
                          keys=KeyStore(catalog))
