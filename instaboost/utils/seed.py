"""One place that owns the global random state and the per-sample seeds.

`seed_everything` seeds Python's `random`, NumPy's legacy global state and MindSpore together
(at the start of a run). Data code never draws from those global states: every sample gets its
own `np.random.Generator` seeded from `sample_seed(base_seed, epoch, index)`, so a run is
reproducible no matter how many workers load data or in which order they finish.
"""
from __future__ import annotations

import random

import numpy as np

# NumPy's legacy `np.random.seed` and Python's `random.seed` accept any non-negative int; the
# legacy state takes 32-bit seeds, so per-sample seeds are drawn from [0, 2**32).
SEED_SPACE = 2**32


def seed_everything(seed: int) -> None:
    """Seed Python `random`, NumPy's global state and MindSpore with `seed` (an int >= 0)."""
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    import mindspore  # local import: data workers that only need sample_seed stay light

    random.seed(int(seed))
    np.random.seed(int(seed) % SEED_SPACE)
    mindspore.set_seed(int(seed))


def sample_seed(base_seed: int, epoch: int, index: int) -> int:
    """Seed of one sample's random stream, an int in [0, 2**32).

    Distinct (base_seed, epoch, index) triples give statistically independent streams
    (NumPy's SeedSequence hashes the whole triple), so data workers never share a stream and
    each epoch augments an image differently.
    """
    for name, value in (("base_seed", base_seed), ("epoch", epoch), ("index", index)):
        if value < 0:
            raise ValueError(f"{name} must be >= 0, got {value}")
    sequence = np.random.SeedSequence([int(base_seed), int(epoch), int(index)])
    return int(sequence.generate_state(1, dtype=np.uint32)[0])
