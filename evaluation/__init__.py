"""Evaluation shared by the scripts: checkpoint loading, perplexity, needle-in-a-haystack, lm-eval adapter.

Each module has one job and imports the models/data packages only when used, so `scripts/*.py --help`
stays fast. Protocols and decisions are in docs/evaluation.md.
"""
