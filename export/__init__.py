"""Samples written for others: a dataset of generated slices with its manifest (sample_set.py)."""
