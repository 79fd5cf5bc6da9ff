"""The activation constants behind the constant-direction bound hold for negative o (m = sqrt(|o + |z|²|)), where f is
no longer 1-Lipschitz: a dense radial sweep (f and g are radial, so their Jacobians are symmetric with the radial slope
and g as eigenvalues) never exceeds them, and each constant is nearly reached (a halved term would fail)."""

import pytest
import torch

from isocompress.core.primitives import isotropic_tanh
from isocompress.exact.constants import activation_constants


@pytest.mark.parametrize("o", [0.0, 0.3, -0.077, -0.5, -1.0, -4.0, -25.0])
def test_activation_constants_bound_a_radial_sweep(o):
    r = torch.linspace(0.0, 20.0 * max(1.0, abs(o)) ** 0.5, 400_001, dtype=torch.float64)
    z = torch.stack([r, torch.zeros_like(r)], dim=-1)
    h, g = isotropic_tanh(z, o)
    h, g = h[:, 0], g[:, 0]
    slope_f = ((h[1:] - h[:-1]) / (r[1:] - r[:-1])).abs().max().item()
    slope_g = ((g[1:] - g[:-1]) / (r[1:] - r[:-1])).abs().max().item()
    lip_f, lip_g, sup_h = activation_constants(o)
    assert slope_f <= lip_f * (1 + 1e-9) and slope_g <= lip_g * (1 + 1e-9) and h.abs().max().item() <= sup_h
    assert g.max().item() <= 1.0 + 1e-12  # tangential slope g ≤ 1
    if o < 0:  # the radial slope's bound 1 + 2|o|/3 is reached at the sphere |z|² = −o
        assert slope_f >= 0.99 * lip_f
