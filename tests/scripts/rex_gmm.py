"""Replica exchange with FlowPerturbationMove on the 12-D Gaussian-mixture System; run under
``mpiexec -n 2`` or alone. Prints (on rank 0) a JSON line with the fraction of state-0 samples in
the left well, its standard error (pymbar statistical inefficiency) and the move statistics.

usage: python rex_gmm.py FLOW_FILE STORAGE_FILE N_ITERATIONS SEED
"""
import json
import math
import sys

import openmm_flowpert as fp  # noqa: F401  (imports torch before openmm)
import numpy as np
from openmm import unit
from openmmtools import multistate, states
from pymbar import timeseries

from openmm_flowpert import FlowPerturbationMove
from openmm_flowpert.moves.replica_rng import seed_replica_exchange
from openmm_flowpert.testsystems import GaussianMixture

flow_file, storage, n_iter, seed = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
gm = GaussianMixture(n_particles=4)
temps = [300.0, 450.0]
thermo = [states.ThermodynamicState(gm.system, t * unit.kelvin) for t in temps]
starts = [states.SamplerState(p * unit.nanometer) for p in gm.sample(2, seed=seed)]
move = FlowPerturbationMove(flow_file, n_proposals=8, prior_scale="sqrt(T/T0)", seed=seed,
                            selection="metropolis")
sampler = multistate.ReplicaExchangeSampler(mcmc_moves=move, number_of_iterations=n_iter)
reporter = multistate.MultiStateReporter(storage, checkpoint_interval=1)
sampler.create(thermodynamic_states=thermo, sampler_states=starts, storage=reporter)
seed_replica_exchange(seed)  # openmmtools' swaps (numpy and numba generators)
sampler.run()

from mpiplus import get_mpicomm  # noqa: E402

comm = get_mpicomm()
if comm is None or comm.rank == 0:
    stats = [m.statistics for m in sampler.mcmc_moves]
    reporter.close()
    rep = multistate.MultiStateReporter(storage, open_mode="r")
    replica_states = rep.read_replica_thermodynamic_states()  # (n_iter + 1, n_replicas)
    left = []
    for it in range(1, replica_states.shape[0]):
        ss = rep.read_sampler_states(it)
        r = int(np.where(replica_states[it] == 0)[0][0])
        left.append(float(ss[r].positions.value_in_unit(unit.nanometer)[0, 0] < 0))
    left = np.asarray(left)
    g = timeseries.statistical_inefficiency(left) if left.std() > 0 else 1.0
    se = float(left.std() * math.sqrt(g / len(left)))
    print(json.dumps({"left": float(left.mean()), "se": se, "n": len(left), "g": float(g),
                      "exact": gm.exact_fraction_left, "stats": stats,
                      "ranks": 1 if comm is None else comm.size}))
