"""facemtl's pipeline: sharding, training, evaluation and prediction of multi-task face-attribute networks."""

import os

# An OpenMP thread waiting for work spins by default; beside loader processes and other jobs on the same CPUs
# that burns the CPU they need. Read when torch loads, so set before any pipeline module imports it (Ray workers
# get it from the job's runtime environment, pipeline.train.thread_environment). The demo's training on 2 busy
# cores: 40 s of CPU and 43-45 s of wall time instead of 63-68 s and 47-56 s; on idle cores the same wall time.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
