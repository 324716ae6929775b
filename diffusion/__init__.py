"""The diffusion math beside the networks of `modules.py`:

    diffusion/gaussian.py   the schedules, the forward process, the reverse steps of every sampler, the loss
    diffusion/guidance.py   classifier-free guidance, autoguidance, guidance in an interval of steps

Scripts import from the submodules.
"""
