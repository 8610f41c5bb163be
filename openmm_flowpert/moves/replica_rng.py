"""Seeding openmmtools' replica-exchange swaps.

openmmtools draws its replica swaps from numpy's global generator and, when numba is installed (it
is here), from numba's own per-process generator inside the jit-compiled ``swap-all`` mixer, which
``np.random.seed`` in Python does not reach. Seeding both makes a replica-exchange run with seeded
moves reproducible.
"""
import zlib

import numpy as np

try:  # pragma: no cover - numba is a dependency of openmmtools' fast mixer, optional here
    from numba import njit

    @njit(cache=False)
    def _seed_numba(seed):
        np.random.seed(seed)
except ImportError:  # pragma: no cover
    _seed_numba = None


def seed_replica_exchange(seed: int, iteration: int = 0) -> None:
    """Seed the generators openmmtools' ReplicaExchangeSampler draws its swaps from.

    Call it before ``sampler.run()``, or before every ``sampler.extend(1)`` with the sampler's
    iteration so a resumed run swaps exactly like an uninterrupted one.

    Parameters
    ----------
    seed : int
        Base seed (any non-negative integer).
    iteration : int, default 0
        Mixed into the seed, giving each iteration its own stream.

    Examples
    --------
    >>> seed_replica_exchange(7)                                  # doctest: +SKIP
    >>> while sampler.iteration < n:                              # doctest: +SKIP
    ...     seed_replica_exchange(7, sampler.iteration); sampler.extend(1)
    """
    s = zlib.crc32(np.asarray([seed, iteration], dtype=np.int64).tobytes())
    np.random.seed(s)
    if _seed_numba is not None:
        _seed_numba(s)
