"""Durable state: the SQLite catalog, its migrations, the encrypted vault, key handling."""
