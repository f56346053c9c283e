"""Seeds derived from a run's seed and a position (rank, epoch, step, sample), for exact resumes."""

from __future__ import annotations

import numpy as np


def derive_seed(*keys: int) -> int:
    """A 63-bit seed that depends on ``keys`` alone (``numpy.random.SeedSequence`` mixing).

    Random draws seeded this way repeat exactly when a run is resumed at the same position,
    whatever happened before (other workers, a restart, another number of loader processes).
    """
    state = np.random.SeedSequence([int(k) for k in keys]).generate_state(1, dtype=np.uint64)
    return int(state[0] >> np.uint64(1))
