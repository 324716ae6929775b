"""Samples written for others: a dataset of generated slices with its manifest (sample_set.py), and the grid, the
sweep rows and the GIF frames a person looks at (figures.py)."""
