"""Garrison: an on-premises LLM appliance (see ARCHITECTURE.md)."""

__version__ = "0.1.0"
