"""NIfTI volumes: one volume read into slices (orientation, slice choice, intensities, physical shape, NaN, the
foreground crop, bad files, memory), folders of volumes and BIDS trees, whose subject each file is, and the
embedded demo data."""
import hashlib
import os
import re
import shutil
import threading
import time
import tracemalloc

import nibabel as nib
import numpy as np
import pytest
import torch

import volumes.reader
from conftest import blob, touch, write_volume
from dataset import SliceFolders, load_slices
from runtime.errors import BadInputError
from volumes.demo import make_demo_dataset
from volumes.holdout import split_by_subject
from volumes.layouts import Layout, subject_id
from volumes.reader import Slicing, read_volume_slices, volume_peak_bytes, volumes_at_once
from volumes.run_data import DataConfig, training_files


# ----------------------------------------------------------------------------- one volume

RAS_MARKER = (12, 5, 9)   # x right, y anterior, z superior, in a 16^3 RAS volume


@pytest.mark.parametrize("stored_as", ["RAS", "LPS", "permuted"])
@pytest.mark.parametrize("axis", ["axial", "coronal", "sagittal"])
def test_marker_voxel_lands_where_ras_says(tmp_path, stored_as, axis):
    ras = np.zeros((16, 16, 16))
    ras[RAS_MARKER] = 1
    affine = np.eye(4)
    if stored_as == "LPS":       # voxel i runs right-to-left, j anterior-to-posterior: the DICOM order
        data, affine[:3, :3] = ras[::-1, ::-1], np.diag([-1, -1, 1])
        affine[:3, 3] = 15, 15, 0
    elif stored_as == "permuted":  # stored (z, x, y): voxel axis 0 is superior, 1 right, 2 anterior
        data, affine[:3, :3] = ras.transpose(2, 0, 1), [[0, 1, 0], [0, 0, 1], [1, 0, 0]]
    else:
        data = ras
    path = write_volume(tmp_path / "v.nii.gz", data, affine)
    slices, span = read_volume_slices(path, 16, slicing=Slicing(axis, slices=1.0, percentiles=(0, 100),
                                                                  crop_foreground=False))
    assert slices.shape == (16, 1, 16, 16) and span == range(16)
    x, y, z = RAS_MARKER
    # radiological views: rows from superior (anterior for axial) down; columns from the patient's right
    # (axial, coronal) or from anterior (sagittal)
    k, row, col = {"axial": (z, 15 - y, 15 - x), "coronal": (y, 15 - z, 15 - x), "sagittal": (x, 15 - z, 15 - y)}[axis]
    assert slices[k, 0, row, col] == 255 and slices.sum() == 255


def test_slice_choice_by_fraction_count_and_foreground(tmp_path):
    data = np.zeros((16, 16, 16))
    data[2:14, 2:14, 3:13] = 100           # a box over axial slices 3..12
    data[7:9, 7:9, 2] = data[7:9, 7:9, 13] = 100  # the ends: a sliver of foreground, < 25% of the box's
    path = write_volume(tmp_path / "v.nii", data)
    span = lambda **kw: read_volume_slices(path, 16, slicing=Slicing(**kw))[1]  # noqa: E731
    assert span() == range(3, 13)          # default: slices with foreground, empty and sliver ends dropped
    assert span(slices=0.5) == range(4, 12) and span(slices=1.0) == range(16)
    assert span(slices=5) == range(5, 10) and span(slices=100) == range(16)
    assert span(axis="coronal") == range(2, 14)


def test_intensities_are_clipped_to_percentiles_and_scaled(tmp_path):
    ramp = np.arange(1000.0).reshape(10, 10, 10)
    path = write_volume(tmp_path / "ramp.nii.gz", ramp)
    slices, _ = read_volume_slices(path, 10, slicing=Slicing(slices=1.0, percentiles=(10, 90)))
    low, high = np.percentile(ramp, (10, 90))
    expected = np.round(np.clip((ramp - low) / (high - low), 0, 1) * 255)
    assert np.array_equal(np.sort(slices.numpy().ravel()), np.sort(expected.ravel()))  # no resize at 10 px
    assert (slices == 0).float().mean() == pytest.approx(0.1, abs=0.01)


@pytest.mark.parametrize("shape, spacing, bright", [((16, 8, 4), (1, 1, 1), (16, 32)),    # wide slice: padded
                                                     ((16, 16, 4), (1, 2, 1), (32, 16))])  # 2 mm rows: taller
def test_slices_keep_their_physical_shape(tmp_path, shape, spacing, bright):
    data = np.ones(shape)
    data[..., 0] = 0                          # a black slice, so that the percentiles differ
    path = write_volume(tmp_path / "v.nii.gz", data, np.diag([*spacing, 1]))
    image = read_volume_slices(path, 32, slicing=Slicing(slices=1, percentiles=(0, 100)))[0][0, 0]
    rows, cols = (image > 127).any(1).sum().item(), (image > 127).any(0).sum().item()
    assert (rows, cols) == bright            # bright rows x columns: height and width in the 32 x 32 image
    assert image[0, 0] == 0 and image[16, 16] == 255  # padded with black around the centred slice


def test_nan_outside_the_brain_is_black_and_its_empty_slices_are_left_out(tmp_path):
    """A z-scored volume, NaN outside the brain: the percentiles are the brain's, the NaN voxels black."""
    inside = blob((16, 16, 16)) > 0
    inside[..., :4] = inside[..., 12:] = False                               # the brain spans axial slices 4..11
    data = np.full(inside.shape, np.nan)
    data[inside] = np.random.default_rng(0).normal(0, 1, inside.sum())
    data[0, 0, 0], data[15, 15, 15] = np.inf, -np.inf                        # counted as missing too
    path = write_volume(tmp_path / "zscored.nii.gz", data)
    slices, span = read_volume_slices(path, 16, slicing=Slicing(crop_foreground=False))
    assert 4 <= span.start and span.stop <= 12                               # not every slice
    assert (slices[:, 0, 0, 0] == 0).all() and slices.float().mean() < 100  # a black background, not grey
    write_volume(tmp_path / "nothing.nii.gz", np.full((16, 16, 16), np.nan))
    with pytest.raises(BadInputError, match="nothing.nii.gz has no foreground"):
        read_volume_slices(tmp_path / "nothing.nii.gz", 16)


def test_slices_are_cropped_to_the_volume_s_foreground_box(tmp_path):
    data = np.zeros((32, 32, 16))
    data[10:22, 8:24, 2:14] = 100            # a brain 12 voxels wide (x) and 16 deep (y) in a 32 x 32 frame
    data[10:22, 8:24, 2] = 0
    data[13:19, 12:20, 2] = 100              # axial slice 2: a smaller cross-section
    data[0, 0, 8] = 100                      # a stray bright voxel in a corner
    path = write_volume(tmp_path / "v.nii.gz", data)

    def extent(k, **kw):                     # bright rows and columns of axial slice k
        image = read_volume_slices(path, 32, slicing=Slicing(slices=1.0, percentiles=(0, 100), **kw))[0][k, 0]
        return (image > 127).any(1).sum().item(), (image > 127).any(0).sum().item()

    rows, cols = extent(8)                   # box 20 x 16 voxels with its margin: scaled by 32 / 20
    assert 24 <= rows <= 27 and 18 <= cols <= 20, (rows, cols)              # the stray voxel did not widen the box
    small_rows, small_cols = extent(2)                                       # one box for every slice of the volume
    assert abs(small_rows - 8 * rows / 16) <= 1 and abs(small_cols - 6 * cols / 12) <= 1
    assert extent(8, crop_foreground=False) == (16 + 1, 12 + 1)              # as it lies in the frame, the stray voxel too


def test_volume_folder_loads_like_images_and_in_three_channels(volume_folder):
    ds = load_slices(volume_folder, 32, 1)
    assert ds.classes == ["AD", "NC"] and ds.images.dtype == torch.uint8
    volumes = sorted({p for p, _ in ds.samples})
    assert len(volumes) == 8 and len(ds) == len(ds.slice_numbers) > 8
    x, label = ds[0]
    assert x.shape == (1, 32, 32) and x.min() == -1 and label == 0 and ds.images.max() > 200
    rgb = load_slices(volume_folder, 32, 3)
    assert rgb.images.shape[1:] == (3, 32, 32) and torch.equal(rgb.images[:, 0], ds.images[:, 0])
    train, held = split_by_subject([p for p, _ in ds.samples], 0.25, seed=0)
    assert len({subject_id(ds.samples[i][0]) for i in held}) == 2          # whole volumes held out
    assert not {ds.samples[i][0] for i in train} & {ds.samples[i][0] for i in held}


def test_bids_tree_is_one_class_and_sessions_of_a_subject_stay_together(tmp_path):
    root = tmp_path / "bids"
    for subject, sessions in (("01", ["1", "2"]), ("02", ["1"]), ("03", []), ("04", []), ("05", [])):
        for ses in sessions or [None]:
            folder = root / f"sub-{subject}" / (f"ses-{ses}/anat" if ses else "anat")
            name = f"sub-{subject}" + (f"_ses-{ses}" if ses else "") + "_T1w.nii.gz"
            write_volume(folder / name, blob(seed=int(subject)))
    write_volume(root / "sub-01" / "ses-1" / "func" / "sub-01_ses-1_bold.nii.gz", blob())   # not anatomy
    write_volume(root / "derivatives" / "sub-01" / "anat" / "sub-01_T1w.nii.gz", blob())      # not a subject
    (root / "dataset_description.json").write_text("{}")
    ds = load_slices(root, 16, 1)
    assert ds.classes == ["all"] and len({p for p, _ in ds.samples}) == 6
    assert subject_id(str(root / "sub-01/ses-2/anat/sub-01_ses-2_T1w.nii.gz")) == "sub-01"
    assert subject_id("/data/AD/patient7.nii.gz") == "/data/AD/patient7.nii.gz"  # no BIDS label: its own subject
    for seed in range(6):
        train, held = split_by_subject([p for p, _ in ds.samples], 0.4, seed)
        held_subjects = {subject_id(ds.samples[i][0]) for i in held}
        assert len(held_subjects) == 2 and not held_subjects & {subject_id(ds.samples[i][0]) for i in train}
        sessions = {p for i in held for p, _ in [ds.samples[i]] if "sub-01" in p}
        assert len(sessions) in (0, 2)                                       # both sessions, or neither


def test_a_bids_trees_classes_can_come_from_a_column_of_its_participants_tsv(tmp_path, capsys):
    """--class-column diagnosis: a BIDS tree (one class, all) gets its classes from participants.tsv, so that the
    hold-out is drawn within each diagnosis and stage 2 can be conditioned on it; a subject without one is left out,
    and the table changed after stage 1 is refused."""
    import driver
    from conftest import SMALL_UNET, SMALL_VQ, ckpt, error_of
    root = tmp_path / "bids"
    rows = ["participant_id\tdiagnosis"]
    for k in range(9):
        write_volume(root / f"sub-{k:02d}" / "anat" / f"sub-{k:02d}_T1w.nii.gz", blob(seed=k))
        rows.append(f"sub-{k:02d}\t{'AD' if k < 4 else 'CN' if k < 8 else 'n/a'}")   # sub-08: no diagnosis
    (root / "participants.tsv").write_text("\n".join(rows) + "\n")
    layout = Layout(class_column="diagnosis")
    folders = SliceFolders(root, 16, 1, layout=layout)
    assert folders.classes == ["AD", "CN"] and folders.unlabelled == 1
    assert sorted((os.path.basename(p)[:6], label) for p, label in folders.samples) == [
        (f"sub-{k:02d}", 0 if k < 4 else 1) for k in range(8)]
    run = tmp_path / "run"
    driver.main(["train-vqvae", "--run", str(run), "--data", str(root), "--preset", "tiny", *SMALL_VQ,
                 "--max-steps", "2", "--holdout", "0.25", "--class-column", "diagnosis", "--slices", "2"])
    summary = capsys.readouterr().out
    assert "classes AD, CN from participants.tsv's 'diagnosis' (1 volume of subjects without one left out)" in summary
    assert "held out: 2 subjects (AD 1 of 4, CN 1 of 4)" in summary                 # drawn within each diagnosis
    driver.main(["train-unet", "--run", str(run), *SMALL_UNET, "--max-steps", "2", "--conditional"])
    assert ckpt(run / "unet.pt")["conditions"][0]["values"] == ["AD", "CN"]
    (root / "participants.tsv").write_text("\n".join(f"{r}\t{k}" for k, r in enumerate(rows)) + "\n")  # a column more
    driver.main(["train-unet", "--run", str(run), "--resume", "--max-steps", "3"])             # the same classes
    (root / "participants.tsv").write_text("\n".join(rows).replace("sub-07\tCN", "sub-07\tAD") + "\n")
    assert "changed since stage 1" in error_of(driver.main, ["train-unet", "--run", str(run), "--resume",
                                                             "--max-steps", "4"])
    (root / "participants.tsv").write_text("\n".join(rows).replace("participant_id", "subject") + "\n")
    assert "its subjects in participant_id" in error_of(driver.main, ["evaluate", "--run", str(run)])
    (root / "participants.tsv").unlink()              # gone: the run's own classes, saved by stage 1, stand in
    assert ckpt(run / "vqvae.pt")["data_config"]["layout"]["subject_classes"] == {
        f"sub-{k:02d}": "AD" if k < 4 else "CN" for k in range(8)}
    driver.main(["train-unet", "--run", str(run), "--resume", "--max-steps", "4"])
    assert ckpt(run / "unet.pt")["step"] == 4
    # the table elsewhere (train-vqvae --labels), its subjects in a column of another name
    elsewhere = tmp_path / "diagnoses.csv"
    elsewhere.write_text("subject,dx,age\n" + "".join(f"sub-{k:02d},{'AD' if k % 2 else 'CN'},{60 + k}\n"
                                                       for k in range(9)))
    other = tmp_path / "other"
    driver.main(["train-vqvae", "--run", str(other), "--data", str(root), "--preset", "tiny", *SMALL_VQ,
                 "--max-steps", "1", "--class-column", "dx", "--labels", str(elsewhere), "--subject-column", "subject",
                 "--slices", "2"])
    assert "classes AD, CN from diagnoses.csv's 'dx'" in capsys.readouterr().out
    layout = ckpt(other / "vqvae.pt")["data_config"]["layout"]
    assert layout["class_table"] == str(elsewhere) and layout["subject_classes"]["sub-08"] == "CN"
    driver.main(["train-unet", "--run", str(other), *SMALL_UNET, "--max-steps", "1", "--condition", "age"])
    assert ckpt(other / "unet.pt")["labels"]["file"] == str(elsewhere)      # stage 1's table, by default
    (root / "participants.tsv").write_text("subj\tdiagnosis\tage\n" + "".join(
        f"sub-{k:02d}\t{'AD' if k < 4 else 'CN'}\t{60 + k}\n" for k in range(9)))   # the data folder's, other column
    own = tmp_path / "own"
    driver.main(["train-vqvae", "--run", str(own), "--data", str(root), "--preset", "tiny", *SMALL_VQ, "--max-steps",
                 "1", "--class-column", "diagnosis", "--subject-column", "subj", "--slices", "2"])
    driver.main(["train-unet", "--run", str(own), *SMALL_UNET, "--max-steps", "1", "--condition", "age"])
    assert ckpt(own / "unet.pt")["labels"]["subject_column"] == "subj"       # stage 1's column, by default
    assert "a resumed stage 1 keeps the classes it read" in error_of(driver.main, [
        "train-vqvae", "--run", str(other), "--resume", "--labels", str(root / "participants.tsv")])
    assert "name the table of --class-column" in error_of(driver.main, [
        "train-vqvae", "--run", str(tmp_path / "third"), "--data", str(root), "--labels", str(elsewhere)])


def test_class_column_without_a_table_or_matching_subjects_says_what_the_table_must_hold(tmp_path):
    root = touch(tmp_path / "ADNI", [f"{s}/MPRAGE/I{k}/ADNI_{s}_MR_I{k}.nii" for k, s in enumerate(("002_S_0295",
                                                                                                 "002_S_0413"))])
    layout = Layout(class_column="group")
    message = str(pytest.raises(BadInputError, SliceFolders, root, 16, 1, layout=layout).value)
    assert "has none: write one, tab-separated, a row per subject, with participant_id" in message
    (root / "participants.tsv").write_text("participant_id\tgroup\n295\tCN\n413\tAD\n")   # ADNI's RIDs
    message = str(pytest.raises(BadInputError, SliceFolders, root, 16, 1, layout=layout).value)
    assert "the files' subjects: 002_S_0295, 002_S_0413 ...; the table's: 295, 413 ..." in message
    (root / "participants.tsv").unlink()                           # a run begun before the classes were saved
    message = str(pytest.raises(BadInputError, SliceFolders, root, 16, 1,
                                layout=Layout(class_column="group", classes_sha1="0" * 40)).value)
    assert "the table this run's stage 1 read its classes from (--class-column group), is not there" in message


def listed(root, **rules) -> list[str]:
    """The files a data folder gives (relative to it) by the default layout or by `rules`; none is read."""
    folders = SliceFolders(root, 16, 1, layout=Layout(**rules)) if rules else SliceFolders(root, 16, 1)
    return sorted(os.path.relpath(p, root) for p, _ in folders.samples)


def test_bids_subtrees_in_class_folders_follow_the_bids_rules(tmp_path):
    root = tmp_path / "data"
    touch(root, ["AD/sub-01/anat/sub-01_T1w.nii.gz", "AD/sub-01/anat/sub-01_T2w.nii.gz",
                 "AD/sub-01/anat/sub-01_desc-brain_mask.nii.gz", "AD/sub-01/func/sub-01_task-rest_bold.nii.gz",
                 "AD/sub-01/ses-2/anat/sub-01_ses-2_run-2_T1w.nii.gz", "AD/sub-01/ses-2/anat/sub-01_ses-2_run-1_T1w.nii.gz",
                 "AD/derivatives/sub-01/anat/sub-01_T1w.nii.gz", "AD/sourcedata/sub-01/anat/sub-01_T1w.nii.gz",
                 "NC/002_S_0295/2006-04-18/ADNI_002_S_0295_MR_20060418.nii.gz",   # no sub-*: a plain volume folder
                 "NC/002_S_0295/2007-05-12/ADNI_002_S_0295_MR_20070512.nii.gz"])
    plain = ["NC/002_S_0295/2006-04-18/ADNI_002_S_0295_MR_20060418.nii.gz",
             "NC/002_S_0295/2007-05-12/ADNI_002_S_0295_MR_20070512.nii.gz"]
    assert listed(root) == ["AD/sub-01/anat/sub-01_T1w.nii.gz", "AD/sub-01/ses-2/anat/sub-01_ses-2_run-1_T1w.nii.gz",
                            *plain]                                          # one T1w per session: the lowest run
    assert listed(root, bids_suffix="T2w") == ["AD/sub-01/anat/sub-01_T2w.nii.gz", *plain]
    assert listed(root, bids_all=True) == ["AD/sub-01/anat/sub-01_T1w.nii.gz",
                                           "AD/sub-01/ses-2/anat/sub-01_ses-2_run-1_T1w.nii.gz",
                                           "AD/sub-01/ses-2/anat/sub-01_ses-2_run-2_T1w.nii.gz", *plain]
    assert len(listed(root, version=1)) == 10                                # the rules before: every NIfTI


def test_a_bids_root_gives_the_plainest_image_of_each_subject_and_session_unless_asked(tmp_path):
    raw = tmp_path / "raw"
    touch(raw, ["sub-01/anat/sub-01_T1w.nii.gz", "sub-01/anat/sub-01_ce-gadolinium_T1w.nii.gz",
                "sub-02/ses-1/anat/sub-02_ses-1_T1w.nii.gz", "sub-02/ses-2/anat/sub-02_ses-2_T1w.nii.gz",
                "derivatives/masks/sub-01/anat/sub-01_T1w.nii.gz"])
    assert listed(raw) == ["sub-01/anat/sub-01_T1w.nii.gz", "sub-02/ses-1/anat/sub-02_ses-1_T1w.nii.gz",
                           "sub-02/ses-2/anat/sub-02_ses-2_T1w.nii.gz"]
    assert listed(raw, bids_entities=("ce-gadolinium",)) == ["sub-01/anat/sub-01_ce-gadolinium_T1w.nii.gz"]
    assert len(listed(raw, bids_all=True)) == len(listed(raw, version=1)) == 4
    fmriprep = tmp_path / "fmriprep"
    native = "sub-01/anat/sub-01_desc-preproc_T1w.nii.gz"
    mni = "sub-01/anat/sub-01_space-MNI152NLin2009cAsym_desc-preproc_T1w.nii.gz"
    touch(fmriprep, [native, mni, "sub-01/anat/sub-01_desc-brain_mask.nii.gz", "sub-01/anat/sub-01_dseg.nii.gz"])
    assert listed(fmriprep) == [native]
    assert listed(fmriprep, bids_entities=("space-MNI152NLin2009cAsym",)) == [mni]
    annexed = tmp_path / "datalad"                    # run-1 never fetched: its link points at nothing
    touch(annexed, ["sub-01/anat/sub-01_run-2_T1w.nii.gz"])
    os.symlink(tmp_path / "annex" / "MD5E-not-fetched", annexed / "sub-01" / "anat" / "sub-01_run-1_T1w.nii.gz")
    assert listed(annexed) == ["sub-01/anat/sub-01_run-2_T1w.nii.gz"]
    assert listed(annexed, version=3) == ["sub-01/anat/sub-01_run-1_T1w.nii.gz"]   # runs begun before: as they were


def test_a_bids_root_leaves_out_what_its_bidsignore_lists(tmp_path):
    raw = tmp_path / "raw"
    touch(raw, ["sub-01/anat/sub-01_T1w.nii.gz", "sub-01/anat/sub-01_rec-norm_T1w.nii.gz",
                "sub-02/anat/sub-02_T1w.nii.gz", "sub-03/anat/sub-03_T1w.nii.gz",
                "tmp_dcm2bids/sub-01/003_MPRAGE.nii.gz", "tmp_dcm2bids/log/x.nii.gz"])   # dcm2bids' leftovers
    assert "holds BIDS sub-* folders and beside them" in str(pytest.raises(BadInputError, listed, raw).value)
    (raw / ".bidsignore").write_text("# dcm2bids\ntmp_dcm2bids/\n*_rec-norm_*\n/sub-03/anat\n")
    assert listed(raw, bids_all=True) == ["sub-01/anat/sub-01_T1w.nii.gz", "sub-02/anat/sub-02_T1w.nii.gz"]
    with pytest.raises(BadInputError, match="beside them"):                  # runs begun before: as they were listed
        listed(raw, version=3)
    sessions = tmp_path / "sessions"                 # gitignore's rules: * stays within a name, **/ spans folders
    touch(sessions, ["sub-01/ses-1/anat/sub-01_ses-1_T1w.nii.gz", "sub-01/anat/sub-01_T1w.nii.gz",
                     "tmp_dcm2bids/helper/001_T1.nii.gz"])
    for patterns in ("**/tmp_dcm2bids/\nsub-*/*.nii.gz", "tmp_dcm2bids/*\nsub-*/ses-*/func", "**/helper\n*.json"):
        (sessions / ".bidsignore").write_text(patterns)
        assert listed(sessions) == ["sub-01/anat/sub-01_T1w.nii.gz", "sub-01/ses-1/anat/sub-01_ses-1_T1w.nii.gz"]
    (sessions / ".bidsignore").write_text("tmp_dcm2bids\nsub-*/anat\n")     # the session-less anat/ only
    assert listed(sessions) == ["sub-01/ses-1/anat/sub-01_ses-1_T1w.nii.gz"]


def test_disk_cache_key_covers_the_slicing(volume_folder, tmp_path, capsys):
    cache = tmp_path / "cache"
    in_memory = load_slices(volume_folder, 16, 1, slicing=Slicing(slices=4))
    four = load_slices(volume_folder, 16, 1, cache_gb=0.0, disk_cache=cache, slicing=Slicing(slices=4))
    assert four.cache_file is not None and len(four) == 32 and torch.equal(four.images, in_memory.images)
    six = load_slices(volume_folder, 16, 1, cache_gb=0.0, disk_cache=cache, slicing=Slicing(slices=6))
    assert len(six) == 48 and "decoded once" in capsys.readouterr().out
    coronal = load_slices(volume_folder, 16, 1, cache_gb=0.0, disk_cache=cache, slicing=Slicing("coronal", slices=6))
    assert not torch.equal(coronal.images, six.images)
    again = load_slices(volume_folder, 16, 1, cache_gb=0.0, disk_cache=cache, slicing=Slicing("coronal", slices=6))
    assert "reused" in capsys.readouterr().out and torch.equal(again.images, coronal.images)
    assert again.samples == coronal.samples and again.slice_numbers == coronal.slice_numbers


def _bad_volume_message(root, **kw) -> str:
    message = str(pytest.raises(BadInputError, load_slices, root, 16, 1, **kw).value)
    assert "\n" not in message
    return message


def test_bad_volumes_are_named_in_one_line(tmp_path):
    good = write_volume(tmp_path / "good.nii.gz", np.random.default_rng(0).uniform(0, 100, (24, 24, 24)))
    cases = {
        "truncated.nii.gz": (good.read_bytes()[:good.stat().st_size // 2], "cannot read volume"),
        "text.nii.gz": (b"this is not a NIfTI file", "cannot read volume"),
        "text.nii": (b"this is not a NIfTI file either", "cannot read volume"),
    }
    for name, (payload, expected) in cases.items():
        root = tmp_path / name.replace(".", "_")
        (root / "AD").mkdir(parents=True)
        (root / "AD" / name).write_bytes(payload)
        message = _bad_volume_message(root)
        assert expected in message and name in message
    write_volume(tmp_path / "flat" / "AD" / "slice.nii.gz", np.ones((16, 16)))
    assert "2D" in _bad_volume_message(tmp_path / "flat") and "slice.nii.gz" in _bad_volume_message(tmp_path / "flat")
    rgb = np.zeros((16, 16, 12), dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])   # a colour FA map
    (tmp_path / "colour" / "AD").mkdir(parents=True)
    nib.save(nib.Nifti1Image(rgb, np.eye(4)), tmp_path / "colour" / "AD" / "fa.nii.gz")
    assert "fa.nii.gz stores ('R', 'G', 'B') per voxel" in _bad_volume_message(tmp_path / "colour")
    (tmp_path / "complex" / "AD").mkdir(parents=True)
    nib.save(nib.Nifti1Image(blob().astype(np.complex64), np.eye(4)), tmp_path / "complex" / "AD" / "signal.nii.gz")
    assert "signal.nii.gz stores complex numbers" in _bad_volume_message(tmp_path / "complex")
    write_volume(tmp_path / "empty" / "AD" / "zeros.nii.gz", np.zeros((16, 16, 16)))
    assert "zeros.nii.gz has no foreground" in _bad_volume_message(tmp_path / "empty")
    four_d = np.stack([blob(seed=1), blob(seed=2) * 0], axis=-1)           # volume 1 is empty
    write_volume(tmp_path / "fmri" / "AD" / "run.nii.gz", four_d)
    message = _bad_volume_message(tmp_path / "fmri")
    assert "run.nii.gz is 4D (2 volumes)" in message and "--volume-index" in message
    assert "no foreground" in _bad_volume_message(tmp_path / "fmri", slicing=Slicing(volume_index=1))
    assert "no --volume-index 2" in _bad_volume_message(tmp_path / "fmri", slicing=Slicing(volume_index=2))
    picked = load_slices(tmp_path / "fmri", 16, 1, slicing=Slicing(volume_index=0))
    write_volume(tmp_path / "one" / "AD" / "run.nii.gz", blob(seed=1))
    assert torch.equal(picked.images, load_slices(tmp_path / "one", 16, 1).images)


def test_a_volume_that_says_nothing_of_its_orientation_is_named(volume_folder, capsys):
    """qform and sform codes 0 (files converted from ANALYZE): nibabel reads LAS, mirrored against RAS files."""
    load_slices(volume_folder, 16, 1)
    assert "orientation" not in capsys.readouterr().out
    bare = volume_folder / "train" / "NC" / "sub-11.nii.gz"
    nib.save(nib.Nifti1Image(np.asarray(nib.load(bare).dataobj), None), bare)   # no affine: both codes 0
    load_slices(volume_folder, 16, 1)
    out = capsys.readouterr().out
    assert "say nothing of their orientation (qform and sform codes 0): 1 of 8" in out
    assert "sub-11.nii.gz" in out and "LAS" in out


def test_volumes_with_corrupt_headers_are_named_or_skipped(tmp_path):
    """What nibabel raises past OSError and ValueError: an unknown datatype code, a negative size, an sform whose
    axes cannot be put in RAS order (a zero column)."""
    plain = write_volume(tmp_path / "plain.nii", blob())
    datatype, negative = bytearray(plain.read_bytes()), bytearray(plain.read_bytes())
    datatype[70:72] = (999).to_bytes(2, "little")                            # the header's datatype code
    negative[42:44] = (-5).to_bytes(2, "little", signed=True)                # dim[1]
    flat = np.eye(4)
    flat[2, 2] = 0
    img = nib.Nifti1Image(blob().astype(np.float32), None)
    img.header.set_sform(flat, code=1)
    for name, payload in {"datatype.nii": bytes(datatype), "negative.nii": bytes(negative),
                          "flat.nii": img.to_bytes()}.items():
        root = tmp_path / name.replace(".", "_")
        write_volume(root / "NC" / "good.nii.gz", blob(seed=1))
        (root / "AD").mkdir()
        (root / "AD" / name).write_bytes(payload)
        assert f"cannot read volume {root / 'AD' / name}" in _bad_volume_message(root)
        assert load_slices(root, 16, 1, skip_bad=True).skipped == [str(root / "AD" / name)]


def test_trailing_singleton_dimensions_are_a_3d_volume_which_is_volume_0(tmp_path):
    volume = blob(seed=1)
    three = load_slices(write_volume(tmp_path / "three" / "AD" / "v.nii.gz", volume).parents[1], 16, 1)
    five = load_slices(write_volume(tmp_path / "five" / "AD" / "v.nii.gz", volume[..., None, None]).parents[1], 16, 1)
    assert torch.equal(five.images, three.images)                            # (x, y, z, 1, 1) is 3D
    write_volume(tmp_path / "vectors" / "AD" / "v.nii.gz", np.stack([volume] * 3, -1)[..., None, :])
    assert "v.nii.gz has 5 dimensions (16, 16, 12, 1, 3)" in _bad_volume_message(tmp_path / "vectors")
    assert "v.nii.gz has 1 volume, so no --volume-index 1" in _bad_volume_message(tmp_path / "three",
                                                                                   slicing=Slicing(volume_index=1))
    picked = load_slices(tmp_path / "five", 16, 1, slicing=Slicing(volume_index=0))
    assert torch.equal(picked.images, three.images)


@pytest.mark.parametrize("nifti", [nib.Nifti1Image, nib.Nifti2Image])
@pytest.mark.parametrize("name", ["v.Nii.Gz", "v.Nii"])
def test_volumes_named_in_mixed_case_are_read(tmp_path, nifti, name):
    """nibabel looks for `v.Nii.Gz` as `v.nii.Gz`, which a file system that tells case apart does not have."""
    image = nifti(blob(seed=2).astype(np.float32), np.eye(4))
    for folder in ("plain", "mixed"):
        (tmp_path / folder / "AD").mkdir(parents=True)
    nib.save(image, tmp_path / "plain" / "AD" / name.lower())
    shutil.copy(tmp_path / "plain" / "AD" / name.lower(), tmp_path / "mixed" / "AD" / name)
    assert torch.equal(load_slices(tmp_path / "mixed", 16, 1).images, load_slices(tmp_path / "plain", 16, 1).images)


def test_reading_a_volume_stays_within_its_estimated_peak(tmp_path):
    """Stored as scaled int16 in LPS order, the costliest case before: nibabel scaled it in float64."""
    data = (blob((48, 48, 48)) * 10).astype(np.int16)
    img = nib.Nifti1Image(data[::-1, ::-1], np.diag([-1.0, -1.0, 1.0, 1.0]))
    img.header.set_slope_inter(2.5, 10.0)
    path = tmp_path / "scaled.nii.gz"
    nib.save(img, path)
    tracemalloc.start()
    slices, _ = read_volume_slices(path, 32)
    peak = tracemalloc.get_traced_memory()[1]                                # numpy's allocations
    tracemalloc.stop()
    assert peak <= 10 * data.size and peak <= volume_peak_bytes(path), peak / data.size
    assert slices.max() > 200


def test_volumes_decoded_at_once_fit_the_memory_budget(volume_folder, monkeypatch):
    paths = sorted(str(p) for p in volume_folder.rglob("*.nii.gz"))
    running, most, lock, read = 0, 0, threading.Lock(), volumes.reader.read_volume

    def counted(*args, **kwargs):
        nonlocal running, most
        with lock:
            running += 1
            most = max(most, running)
        time.sleep(0.02)
        try:
            return read(*args, **kwargs)
        finally:
            with lock:
                running -= 1

    monkeypatch.setattr(volumes.reader, "read_volume", counted)
    monkeypatch.setattr(volumes.reader, "VOLUME_MEMORY_BUDGET", 2 * volume_peak_bytes(paths[0]) + 1)
    load_slices(volume_folder, 16, 1, workers=4)
    assert most == 2 == volumes_at_once(paths, 4)
    monkeypatch.setattr(volumes.reader, "VOLUME_MEMORY_BUDGET", 1)
    assert volumes_at_once(paths, 4) == 1                                    # one at a time, however large
    monkeypatch.setattr(volumes.reader, "VOLUME_MEMORY_BUDGET", 2 ** 40)
    assert volumes_at_once(paths, 4) == 4


def test_a_folder_mixing_images_and_volumes_is_refused(adni_folder, volume_folder):
    write_volume(adni_folder / "train" / "AD" / "sub-99.nii.gz", blob())
    message = _bad_volume_message(adni_folder)
    assert "mixes images" in message and "sub-99.nii.gz" in message
    (adni_folder / "train" / "AD" / "sub-99.nii.gz").unlink()
    shutil.rmtree(adni_folder / "test")
    shutil.copytree(volume_folder / "test", adni_folder / "test")           # train/ images, test/ volumes
    assert "keep one kind" in _bad_volume_message(adni_folder)


def test_skip_bad_leaves_out_an_unreadable_volume(volume_folder):
    bad = volume_folder / "train" / "NC" / "sub-11.nii.gz"
    bad.write_bytes(bad.read_bytes()[:200])
    assert "sub-11.nii.gz" in _bad_volume_message(volume_folder)
    ds = load_slices(volume_folder, 16, 1, skip_bad=True)
    assert ds.skipped == [str(bad)] and len({p for p, _ in ds.samples}) == 7 and str(bad) not in dict(ds.samples)
    assert len(ds) == len(ds.images) == len(ds.labels)
    config = DataConfig(root=str(volume_folder), image_size=16, skip_bad_images=True)
    files, classes = training_files(config)
    assert files == ds.samples and classes == ["AD", "NC"]              # the same slices, found without resizing


# ----------------------------------------------------------------------------- whose files

ADNI_VISITS = [f"/data/AD/ADNI_002_S_{p:04d}/ADNI_002_S_{p:04d}_MR_MPRAGE_br_raw_{date}.nii.gz"
               for p in range(295, 305) for date in ("20060418", "20070512")]


def test_the_visits_of_one_adni_subject_stay_on_one_side_of_the_hold_out():
    participant = [re.search(r"_S_(\d{4})_MR", p).group(1) for p in ADNI_VISITS]
    for seed in range(4):
        train, held = split_by_subject(ADNI_VISITS, 0.3, seed)
        assert len(held) == 6 and not {participant[i] for i in train} & {participant[i] for i in held}


def test_subject_ids_follow_one_rule_for_images_and_volumes():
    assert subject_id(ADNI_VISITS[0]) == subject_id(ADNI_VISITS[1]) == "002_S_0295"
    assert subject_id("/x/AD/002_S_0295_067.jpeg") == "002_S_0295"
    assert subject_id("/x/AD/1234_S_5678_099.jpeg") == "1234_S_5678"        # not 234_S_5678: <subject>_<slice>
    assert subject_id("/x/AD/sub-007_052.png") == "sub-007"
    assert subject_id("/x/AD/sub-01/ses-2/anat/scan.nii.gz") == "sub-01"     # the BIDS label of a folder
    assert subject_id("/x/sub-study/AD/patient7_2.nii.gz") == "patient7"     # not a folder above the data
    assert subject_id("/x/sub-study/train/AD/1234_S_5678_099.jpeg") == "1234_S_5678"
    assert subject_id("/x/AD/patient7_2.nii.gz") == "patient7"              # <subject>_<number>, volumes too
    assert subject_id("/x/AD/scan.png") == "/x/AD/scan.png"                  # unparseable: its own subject
    assert Layout(subject_pattern=r"P(?P<subject>\d+)-visit").subject("/x/P12-visit3.nii.gz") == "12"
    assert Layout(subject_pattern=r"^([a-z]+)\d").subject("/x/abc1.png") == "abc"
    assert Layout(subject_pattern=r"B\d+").subject("/x/scanB77_1.nii") == "B77"
    with pytest.raises(BadInputError) as e:                                 # a guess could leak a subject
        Layout(subject_pattern=r"B\d+").subject("/x/scan.nii")
    assert "--subject-pattern 'B\\\\d+' does not match /x/scan.nii" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(BadInputError, match="not a regular expression"):
        Layout(subject_pattern="(")
    old = Layout(version=1)                                                  # the rules of runs written before
    assert old.subject(ADNI_VISITS[0]) == ADNI_VISITS[0] and old.subject("/x/AD/1234_S_5678_099.jpeg") == "1234_S_5678"


def test_adni_folders_and_oasis_names_keep_a_subject_s_visits_together():
    dcm2niix = ["/d/AD/002_S_0295/MPRAGE/2006-04-18_08_20_30.0/I40966/MPRAGE_20060418082030_2.nii",
                "/d/AD/002_S_0295/MPRAGE/2007-05-12_09_10_11.0/I55123/MPRAGE_20070512091011_2.nii"]
    assert {subject_id(p, root="/d") for p in dcm2niix} == {"002_S_0295"}
    assert subject_id("/002_S_0295/data/AD/scan.nii", root="/002_S_0295/data") == "AD/scan.nii"  # not above the data
    oasis = ["/d/NC/OAS1_0001_MR1_mpr-1_100.jpg", "/d/NC/OAS1_0001_MR2_mpr-1_100.jpg",
             "/d/NC/OAS1_0001_MR1_mpr-2_120.jpg"]
    assert {subject_id(p, root="/d") for p in oasis} == {"OAS1_0001"}
    oasis3 = ["/d/NC/OAS30001_MR_d0129.nii.gz", "/d/NC/OAS30001_MR_d0757.nii.gz", "/d/NC/OAS30001_MR_d2430_T1w.nii"]
    assert {subject_id(p, root="/d") for p in oasis3} == {"OAS30001"} != {subject_id("/d/NC/OAS30002_MR_d0129.nii")}
    assert len({Layout(version=3).subject(p, "/d") for p in oasis3}) == 3   # runs begun before OASIS-3's rule
    assert Layout(version=3, subject_pattern=r"^([^/_]+)_").subject("/d/AD/s01_a.png", "/d") == "s01"   # the name
    assert Layout(subject_pattern=r"^([^/]+/\w+)/").subject("/d/AD/s01/a.png", "/d") == "AD/s01"     # the path
    old = Layout(version=2)                                                  # runs begun before: their subjects
    assert len({old.subject(p, "/d") for p in dcm2niix}) == 2 and len({old.subject(p, "/d") for p in oasis}) == 3
    assert old.subject("/d/AD/scan.png", "/d") == "/d/AD/scan.png"            # a file of no subject: its path
    assert Layout().subject("/d/AD/scan.png", "/d") == "AD/scan.png"          # its path in the data folder

def test_a_subject_s_folder_below_its_class_folder_names_its_files():
    """Layout version 5: where a file's name carries no subject ID, the folder below its class folder does; a name's
    `<subject>_<number>` counts only where the subject holds a digit (patient7_2, not slice_078)."""
    assert subject_id("/d/AD/patient01/slice_078.png", root="/d") == "patient01"
    assert subject_id("/d/AD/patient01/078.png", root="/d") == "patient01"
    assert subject_id("/d/train/AD/patient01/slice_078.png", root="/d") == "patient01"        # below a split folder
    assert subject_id("/d/NC/0295/visit1/T1.nii.gz", root="/d") == "0295"                      # visits in folders
    assert subject_id("/d/AD/slices/patient01_078.png", root="/d") == "patient01"             # the name's, first
    assert subject_id("/d/AD/sub-0295/slice_080.png", root="/d") == "sub-0295"                # a BIDS label folder
    assert subject_id("/d/AD/slice_078.png", root="/d") == "slice"                            # no folder: as before
    assert subject_id("/d/AD/scan.png", root="/d") == "AD/scan.png"
    assert subject_id("/sub-x/d/AD/scan.png", root="/sub-x/d") == "AD/scan.png"               # not above the data
    v4 = Layout(version=4)                                                   # runs begun before: their subjects
    assert [v4.subject(p, "/d") for p in ("/d/AD/patient01/slice_078.png", "/d/NC/0295/visit1/T1.nii.gz",
                                           "/d/AD/sub-0295/slice_080.png")] == ["slice", "NC/0295/visit1/T1.nii.gz",
                                                                                 "slice"]


# ----------------------------------------------------------------------------- the embedded demo data

def _digest(folder):
    h = hashlib.sha256()
    for f in sorted(folder.rglob("*.nii.gz")):
        h.update(f.relative_to(folder).as_posix().encode())
        h.update(f.read_bytes())
    return h.hexdigest()


def test_demo_data_is_deterministic_for_a_seed(tmp_path):
    a = make_demo_dataset(tmp_path / "a", seed=5, subjects=8, slices=2, size=64)
    b = make_demo_dataset(tmp_path / "b", seed=5, subjects=8, slices=2, size=64)
    c = make_demo_dataset(tmp_path / "c", seed=6, subjects=8, slices=2, size=64)
    assert _digest(a) == _digest(b) != _digest(c)
    assert sorted(p.name for p in (a / "train" / "AD").iterdir()) == ["sub-001.nii.gz", "sub-003.nii.gz", "sub-005.nii.gz"]
    ds = load_slices(a, image_size=64, channels=1)                     # volumes, sliced by the default rule
    assert len(ds) == 16 and ds.classes == ["AD", "NC"]
    assert len(load_slices(a / "test", 64, 1)) == 4                    # subjects 6 and 7 are held as test
    img = np.stack([ds[i][0].numpy() for i in range(len(ds))])
    assert img.std() > 0.3 and (img > -0.9).mean() > 0.2              # a bright brain on a black background
    mtime = (a / "train").stat().st_mtime_ns
    make_demo_dataset(a, seed=5, subjects=8, slices=2, size=64)       # reused, not rewritten
    assert (a / "train").stat().st_mtime_ns == mtime


def test_a_runs_demo_data_deleted_with_its_cache_is_built_again_the_same(tmp_path, monkeypatch):
    """A run trained on the demo data saves its folder; a cleared ~/.cache must not end the run (nor `demo`)."""
    from functools import partial
    monkeypatch.setattr(volumes.demo, "make_demo_dataset",
                        partial(make_demo_dataset, subjects=8, slices=2, size=64))    # small, built as the real one
    folder = volumes.demo.demo_data_dir(tmp_path, seed=5)
    digest = _digest(folder)
    shutil.rmtree(folder)
    (tmp_path / f"{folder.name}.tmp999" / "train").mkdir(parents=True)     # a build killed before it finished
    assert DataConfig(root=str(folder)).folder() == folder and _digest(folder) == digest
    assert not list(tmp_path.glob("*.tmp*"))
    assert DataConfig(root=str(tmp_path / "mine")).folder() == tmp_path / "mine"        # another folder: not made
    assert not (tmp_path / "mine").exists()
    older = tmp_path / "mni152-demo-v2-seed0"                              # an earlier version's: not this code's
    message = str(pytest.raises(BadInputError, DataConfig(root=str(older)).folder).value)
    assert f"(version 2), is gone, and this code builds version {volumes.demo.DEMO_VERSION} alone" in message
    assert not older.exists()


def test_the_demo_data_is_built_once_when_two_processes_ask_for_it_at_once(tmp_path, monkeypatch):
    """The ranks of torchrun each ask for it: one built it while the other deleted that copy to put its own."""
    built, build = [], volumes.demo._build

    def slow_build(out, *args):
        built.append(out)
        time.sleep(0.3)                                                  # the other one asks in the meantime
        build(out, *args)

    monkeypatch.setattr(volumes.demo, "_build", slow_build)
    out, found = tmp_path / "demo", []
    ranks = [threading.Thread(target=lambda: found.append(make_demo_dataset(out, seed=5, subjects=4, slices=2,
                                                                            size=32))) for _ in range(2)]
    for rank in ranks:
        rank.start()
    for rank in ranks:
        rank.join()
    assert built == [out] and found == [out, out] and len(load_slices(out, 32, 1)) == 8
