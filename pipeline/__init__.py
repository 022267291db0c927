"""facemtl's pipeline: sharding, training, evaluation and prediction of multi-task face-attribute networks."""

import os

# An OpenMP thread waiting for work spins a while by default; beside loader processes and other jobs on the same
# CPUs that burns the CPU they need. Read when torch loads, so set before any pipeline module imports it (Ray
# workers get it from the job's runtime environment, pipeline.train.thread_environment). bench/omp_wait_policy.py,
# the demo's step beside 2 busy processes: 0.71x the wall time and 0.57x the CPU of libgomp's default; on idle
# cores up to 1.11x the wall time (export OMP_WAIT_POLICY=ACTIVE on a dedicated CPU node).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
