"""Helpers for train.py: config checks, distributed setup, optimizer, checkpoints, metrics and sinks.

Each module has one job; none imports Hydra at import time except `hydra_setup`, so the pieces are
usable from scripts and tests without a Hydra run.
"""
