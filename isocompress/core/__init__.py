"""The core: the model and its config, pure float64 tensor functions, the verbs that edit one layer, and the small
services every floor uses (errors, parsing, limits, threads, progress, measures). Imports nothing above it."""
