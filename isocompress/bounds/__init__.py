"""Certified error bounds: the global bound over |x| ≤ R (bounds.certified) and per-point local certificates with
the counterexample search (bounds.local); derivations in docs/bounds.md."""
