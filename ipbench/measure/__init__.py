"""Measurements: accuracy here; GMACs (flops.py) and throughput (throughput.py) beside it."""
