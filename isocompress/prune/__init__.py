"""Lossy pruning to a parameter budget, an error limit or a certified-top-1 goal, with its report."""
