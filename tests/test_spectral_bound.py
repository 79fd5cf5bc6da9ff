"""spectral_norm_upper (what the constant-direction rule's Lipschitz chain uses) is an upper bound on ‖A‖₂ and a tight
one: over random shapes, scales and ranks it is never below the largest singular value and within 1e-8 of it."""

import torch
from hypothesis import given
from hypothesis import strategies as st

from isocompress.core.primitives import spectral_norm_upper


@given(st.integers(1, 40), st.integers(1, 40), st.integers(0, 40), st.floats(1e-6, 1e6), st.integers(0, 2**31))
def test_spectral_norm_upper_bounds_the_largest_singular_value(n_out, n_in, rank, scale, seed):
    gen = torch.Generator().manual_seed(seed)
    rank = min(rank, n_out, n_in)
    a = (torch.randn(n_out, rank, dtype=torch.float64, generator=gen)
         @ torch.randn(rank, n_in, dtype=torch.float64, generator=gen)) * scale
    true = float(torch.linalg.svdvals(a)[0]) if rank > 0 else 0.0
    upper = spectral_norm_upper(a)
    assert upper >= true
    assert upper <= true * (1 + 1e-8)  # tight: the margin is rounding-sized


def test_spectral_norm_upper_of_a_diagonal_and_of_zero():
    assert spectral_norm_upper(torch.diag(torch.tensor([3.0, -5.0, 1.0], dtype=torch.float64))) >= 5.0
    assert spectral_norm_upper(torch.diag(torch.tensor([3.0, -5.0, 1.0], dtype=torch.float64))) <= 5.0 * (1 + 1e-12)
    assert spectral_norm_upper(torch.zeros(3, 4, dtype=torch.float64)) == 0.0
