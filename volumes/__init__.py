"""NIfTI volumes and the folders that hold them, for dataset.py: `reader.py` reads one volume into uint8 slices,
`layouts.py` says which files a data folder holds and whose (which subject's) each one is, `run_data.py` which
files and subjects a run trains on (`DataConfig`), `demo.py` writes the embedded demo data as volumes;
`add_arguments` below declares train-vqvae's flags of both."""
from __future__ import annotations

import argparse

from volumes.layouts import entity_list
from volumes.reader import percentile_pair, slice_count_or_fraction


def add_arguments(p: argparse.ArgumentParser):
    """train-vqvae's flags of NIfTI volumes (--data folders of .nii/.nii.gz) and BIDS trees, saved in DataConfig's
    Slicing and Layout."""
    p.add_argument("--axis", choices=["axial", "coronal", "sagittal"], default="axial", help="slicing axis of volumes (default: %(default)s)")
    p.add_argument("--slices", type=slice_count_or_fraction, default=None,
                   help="slices per volume: a central fraction (0.6) or count (20) (default: from the first to the last slice with >= 25%% of the fullest slice's foreground)")
    p.add_argument("--volume-index", type=int, default=None, help="volume of a 4D file to slice (default: none; a 4D file is an error)")
    p.add_argument("--intensity-percentiles", type=percentile_pair, default=(0.5, 99.5),
                   help="LOW,HIGH: each volume is clipped to these percentiles, then scaled to 0-255 (default: 0.5,99.5)")
    p.add_argument("--crop-foreground", action=argparse.BooleanOptionalAction, default=True,
                   help="crop each volume's slices to its in-plane foreground box before padding and resizing (default: on)")
    p.add_argument("--subject-pattern", default=None,
                   help="REGEX searched in each file name (a REGEX with a / in its path below --data): its group "
                        "`subject` (else group 1, else the match) names the subject, for --holdout (default: BIDS "
                        "sub-*, ADNI's 002_S_0295, OASIS, else <subject>_<number>)")
    p.add_argument("--bids-suffix", default="T1w", help="BIDS images taken: those with this suffix, T2w, FLAIR ... (default: %(default)s)")
    p.add_argument("--bids-entities", type=entity_list, default=(),
                   help="ENT-VAL,...: only BIDS images carrying these entities, e.g. space-MNI152NLin2009cAsym (default: any)")
    p.add_argument("--bids-all", action="store_true",
                   help="every matching BIDS image of a subject and session (default: the one with the fewest entities)")
    p.add_argument("--class-column", default=None, metavar="COLUMN",
                   help="the classes (AD, CN ...) are each subject's value in this column of the data folder's "
                        "participants.tsv, e.g. a BIDS tree's diagnosis; files of subjects without one are left out "
                        "(default: the class folders; a BIDS tree is one class, all)")
    p.add_argument("--labels", default=None, metavar="FILE",
                   help="--class-column's participants table, CSV or TSV, one row per subject, or with "
                        "--session-column a table of scans; what stage 1 reads of it is saved with the run (the "
                        "table changed later is refused, moved or deleted not needed); stage 2's conditions default "
                        "to it too (default: the data folder's participants.tsv)")
    p.add_argument("--subject-column", default=None,
                   help="that table's column of subject IDs, matched to the files' subjects, or with --session-column "
                        "giving them (default: participant_id)")
    p.add_argument("--session-column", default=None,
                   help="makes --labels a table of scans, a row per scan, this column naming each (ADNI's search CSV: "
                        "--labels ADNI_search.csv --subject-column Subject --session-column 'Image Data ID'): each "
                        "file is then its scan's subject's, for --holdout, where the file names hold scan IDs "
                        "(218391_78.jpeg), and stage 2's conditions default to the table (default: none)")
