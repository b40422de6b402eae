"""The job runner: catalog-backed jobs run in worker subprocesses."""
