"""mopd: multi-teacher on-policy distillation for Mixture-of-Experts students."""

import os

# Idle OpenMP threads must sleep, not spin: on a small machine the trainer, the world builder and
# several engine actors share the cores, and spinning threads made each 5-10x slower here. Has to be
# set before torch is imported (libgomp reads it once).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
