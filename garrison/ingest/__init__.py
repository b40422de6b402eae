"""Ingestion: sealed delivery, formats and validation, PII redaction, into the vault."""
