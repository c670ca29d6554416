"""Shared test settings."""

import os

# Set before torch is imported: spinning OpenMP workers slow every other process on a
# small shared machine several-fold.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
