"""Training side: tiny model builders, and (later) fine-tuning workers. Imports torch: never from the daemon."""
