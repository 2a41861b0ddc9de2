"""Adapter heads as data: zero-shot prompt ensembles (more heads to come)."""
