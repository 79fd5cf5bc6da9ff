import os

import pytest
import torch
from hypothesis import settings

settings.register_profile("ci", deadline=None, max_examples=40, derandomize=True)
settings.register_profile("dev", deadline=None, max_examples=20)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def seeded_torch():
    """Every test starts from the same global RNG state, whatever ran before it on its xdist worker."""
    torch.manual_seed(0)


@pytest.fixture
def f64_inputs():
    """Random inputs at several scales, including far outside any data."""

    def make(n_in: int, n: int = 64, seed: int = 1) -> torch.Tensor:
        gen = torch.Generator().manual_seed(seed)
        scales = torch.tensor([0.001, 0.1, 1.0, 10.0, 1000.0], dtype=torch.float64)
        x = torch.randn(n, n_in, dtype=torch.float64, generator=gen)
        return x * scales[torch.arange(n) % len(scales)][:, None]

    return make


def cli(args):
    """Run the isocompress CLI in-process (click's CliRunner); exceptions other than SystemExit propagate."""
    from click.testing import CliRunner

    from isocompress.cli import main

    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def one_error_line(result) -> str:
    """The single line a failed command prints on stderr (and that there is exactly one, without a traceback)."""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.output
    return lines[0]
