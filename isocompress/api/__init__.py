"""One top-level verb per user action (shrink a file, recipes, inspection): what the CLI and `check` call."""
