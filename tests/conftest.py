"""Test-session settings shared by all test modules."""

import os

# One intra-op thread: the tiny model gains nothing from more, and on a busy (shared CI) machine
# OpenMP threads that wait on each other at every barrier make a 10 ms step take seconds.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

torch.set_num_threads(1)
