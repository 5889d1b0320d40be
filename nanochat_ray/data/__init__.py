"""Datasets: where each one lives (registry.py: the hub or a local mirror) and how to read it."""
