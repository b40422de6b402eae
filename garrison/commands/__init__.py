"""Command groups of the `garrison` CLI that are more than a few lines: faces over the domains and
operations, kept out of the domain packages so those never import the CLI."""
