"""NIfTI volumes and the folders that hold them, for dataset.py: `reader.py` reads one volume into uint8 slices,
`layouts.py` says which files a data folder holds and whose (which subject's) each one is, `demo.py` writes the
embedded demo data as volumes."""
