"""What training, sampling, evaluation and the benchmarks share (the networks and the data are defined elsewhere):

    runtime/errors.py       BadInputError (one-line messages for inputs a user can fix), Interrupted
    runtime/process.py      device and precision, torchrun processes and rank helpers, random states
    runtime/signals.py      SIGINT/SIGTERM during training: finish the step, save, stop; SIGTERM elsewhere as Ctrl-C
    runtime/loop.py         the training loop every stage shares: optimizer steps, the learning rate's schedule,
                            logs, grids, NaN checks, checkpoints and stops
    runtime/optimizer.py    AdamW (fused where it can be) and loading its state into another memory layout
    runtime/graphs.py       the UNet's sampling calls replayed from CUDA graphs
    runtime/posthoc_ema.py  EDM2's post-hoc EMA: power-function EMAs kept while training, snapshots, any length rebuilt
    runtime/checkpoint.py   atomic saves that keep the previous file, safe loading with kind/version/config
                            checks, weight fingerprints, the run folder's config.json
    runtime/models.py       a trained run's models rebuilt from its checkpoints alone (load_run, load_vqvae),
                            checked to belong together, and autoguidance's guide

Scripts import from the submodules; nothing here imports train.py, predict.py or driver.py.
"""
