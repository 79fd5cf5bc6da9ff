"""Cost control of the certified bound and the adversarial search (issue 12): the case split is abandoned past its
work limit (the chain and split chain stay, so the certificate stays proven), and the search's effort is cut on big
networks."""

import time

import torch

from isocompress.bounds import certified as bounds
from isocompress.core.model import random_model
from isocompress.prune import budget as prune

F64 = torch.float64


def _pruned_state(widths, share=0.3, seed=0, **kw):
    model = random_model(widths, seed=seed, **kw)
    state = prune.State.of(model)
    gen = torch.Generator().manual_seed(seed)
    for i, m in enumerate(state.removed):
        m[:] = torch.rand(m.numel(), generator=gen) < share
        state.consts[i][:] = state.layers[i].bias
    return model, state


def test_symbolic_bound_gives_up_past_its_work_limit():
    _, s = _pruned_state([2, 5, 5, 3], psi=True, o=0.5)
    full = bounds.symbolic_bound(s.layers, s.removed, s.consts, 3.0)
    assert full is not None and 0 < full["work"] <= bounds.SYMBOLIC_WORK_FLOOR
    assert bounds.symbolic_bound(s.layers, s.removed, s.consts, 3.0, work_limit=full["work"] / 2) is None
    again = bounds.symbolic_bound(s.layers, s.removed, s.consts, 3.0, work_limit=full["work"])
    assert again is not None and again["bound"] == full["bound"]  # the limit changes nothing when it is not hit


def test_certified_bound_without_the_case_split_is_the_chains_minimum(monkeypatch):
    _, s = _pruned_state([2, 5, 5, 3], psi=True, o=0.5)
    monkeypatch.setattr(bounds, "SYMBOLIC_WORK_FLOOR", 0.0)
    monkeypatch.setattr(bounds, "SYMBOLIC_WORK_FACTOR", 1e-9)
    cert = bounds.certified_bound(s.layers, s.removed, s.consts, 3.0)
    split = bounds.split_chain_bound(s.layers, s.removed, s.consts, 3.0)
    assert "symbolic_bound" not in cert
    assert cert["bound"] == min(cert["chain_bound"], split["bound"])


def test_a_wide_network_is_certified_quickly_and_above_the_search():
    """256 wide, 4 hidden spaces: before the work limit the case split ran for many minutes here."""
    model, s = _pruned_state([16, 256, 256, 256, 256, 4], share=0.2, o=(0.0, 1.0))
    start = time.perf_counter()
    cert = bounds.certified_bound(s.layers, s.removed, s.consts, 4.0)
    seconds = time.perf_counter() - start
    assert seconds < 60, seconds
    found = bounds.adversarial_search(model, prune.materialize(s), 4.0, restarts=8, steps=40)["max_abs"]
    assert cert["bound"] >= found > 0


def test_search_effort_is_kept_small_and_cut_large():
    assert bounds.search_effort(10_000, 48, 150, 17) == (48, 150)  # a shipped-size network: as asked
    r, s = bounds.search_effort(2_000_000, 48, 150, 17)
    assert (r, s) != (48, 150) and s >= min(150, bounds.SEARCH_MIN_STEPS) and r >= bounds.SEARCH_MIN_RESTARTS
    cost = 2_000_000 * (6.0 * s * (2 * r + 17) + 2.0 * bounds.SCREEN_PER_RESTART * r)
    assert cost <= bounds.SEARCH_WORK
    r_huge, s_huge = bounds.search_effort(10 ** 10, 48, 150, 17)  # floors, even past the limit
    assert (r_huge, s_huge) == (bounds.SEARCH_MIN_RESTARTS, bounds.SEARCH_MIN_STEPS)
    assert bounds.search_effort(10 ** 10, 4, 20, 17) == (4, 20)  # never more than asked
