"""Stage 1's losses beyond the VQ-VAE's own (`train-vqvae`, and `train-decoder`, which fine-tunes its decoder alone):
what the reconstruction is measured with (`reconstruction.py`: the clamped output, L1 or MSE, Laplacian L1, the focal
frequency loss), perceptual terms (`perceptual.py`: VGG16 features, pretrained or random), and the adversarial patch
loss and its discriminator's training (`adversarial.py`); `stage1.py` sums those a run's flags switch on
(`ReconstructionLoss`), declares those flags (`add_arguments`) and reads them once into `Stage1LossConfig`
(`from_args`), which is all the losses see of the command line. `modules.py` holds the networks they train.
"""
