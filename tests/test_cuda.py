"""The CUDA paths, on a real GPU: `pytest -m cuda` selects these (bench/gpu_check.py runs them first). Without a GPU
they are skipped; their CPU counterparts (the same bookkeeping replayed eagerly, resumes on the CPU) run everywhere."""
import dataclasses

import pytest
import torch

import predict
from conftest import ckpt, random_latent_diffusion, vqvae
from runtime.models import LatentDiffusion, for_sampling

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def on_gpu(model: LatentDiffusion, device: torch.device) -> LatentDiffusion:
    """The miniature pair on `device`, the UNet as predict.py runs it there (eval, frozen, NHWC)."""
    model.vqvae.to(device)
    model.diffusion.to(device)
    return dataclasses.replace(model, unet=for_sampling(model.unet, device))


@pytest.mark.parametrize("sampler, steps, repeat_times, guided", [
    ("ddpm", 20, 2, False), ("ddpm", 20, 2, True),     # the card's DDPM with its repeated final steps
    ("ddim", 6, 0, False), ("ddim", 6, 0, True), ("dpmpp", 6, 0, False), ("dpmpp", 6, 0, True),
    ("dpmpp-sde", 6, 0, False)])
def test_graph_replayed_sampling_equals_the_eager_path_on_a_gpu(sampler, steps, repeat_times, guided):
    """The same seed gives the same samples and GIF frames whether the UNet's calls are launched one by one or
    replayed from CUDA graphs (captured for real here), over a last batch of another size, on the last GPU (another
    than the current one where there are two)."""
    device = torch.device("cuda", torch.cuda.device_count() - 1)
    model = on_gpu(random_latent_diffusion(), device)
    labels = torch.tensor([[0.0], [1.0], [float("nan")], [1.0], [0.0]]) if guided else None
    runs = []
    for cuda_graphs in (False, True):
        sampling = predict.Sampling(sampler, steps, repeat_last=5, repeat_times=repeat_times, batch_size=3,
                                    gif_frames=3, cuda_graphs=cuda_graphs)
        torch.manual_seed(1)
        images, frames, _ = predict.generate(model, sampling, 5, labels, 3.0)
        runs.append((images, frames))
    (eager, eager_frames), (graphed, graphed_frames) = runs
    assert eager.shape == (5, 1, 16, 16) and torch.allclose(eager, graphed, atol=1e-4)
    assert [c for c, _, _ in eager_frames] == [c for c, _, _ in graphed_frames]
    assert all(torch.allclose(a, b, atol=1e-4) for (_, a, _), (_, b, _) in zip(eager_frames, graphed_frames))
    assert torch.cuda.current_device() == 0


def test_fp16_training_resumes_with_its_grad_scaler_and_cuda_random_state(adni_folder, tmp_path):
    """Stage 1 in fp16 on the GPU (with the adversarial loss, whose discriminator has its own GradScaler), stopped
    after 3 steps and resumed to 6, ends where an uninterrupted run ends; the checkpoint holds both scalers and
    the CUDA random state."""
    flags = ["--device", "cuda", "--precision", "fp16", "--deterministic", "--warmup", "1", "--cooldown", "0",
             "--adversarial-weight", "0.1", "--adversarial-start", "0"]
    vqvae(tmp_path / "whole", adni_folder, "--max-steps", "6", *flags)
    vqvae(tmp_path / "cut", adni_folder, "--max-steps", "3", *flags)
    saved = ckpt(tmp_path / "cut" / "vqvae.pt")
    assert saved["scaler"]["scale"] > 0 and saved["disc_scaler"]["scale"] > 0
    assert all("cuda" in state for state in saved["rng"])
    vqvae(tmp_path / "cut", adni_folder, "--max-steps", "6", "--resume", *flags)
    whole, cut = ckpt(tmp_path / "whole" / "vqvae.pt"), ckpt(tmp_path / "cut" / "vqvae.pt")
    assert cut["step"] == whole["step"] == 6 and cut["scaler"] == whole["scaler"]
    for part in ("model", "discriminator"):
        assert max((whole[part][k].float() - cut[part][k].float()).abs().max().item() for k in whole[part]) < 1e-4


def test_a_gpu_run_saved_in_nhwc_resumes_in_nchw(adni_folder, tmp_path):
    """Trained channels-last on the GPU (its default), resumed without it: the weights of an uninterrupted run
    within the two layouts' rounding (moments applied to the wrong elements moved them by 10 on the CPU)."""
    flags = ["--device", "cuda", "--precision", "fp32", "--deterministic", "--warmup", "1", "--cooldown", "0"]
    vqvae(tmp_path / "whole", adni_folder, "--max-steps", "6", "--channels-last", *flags)
    vqvae(tmp_path / "cut", adni_folder, "--max-steps", "3", "--channels-last", *flags)
    vqvae(tmp_path / "cut", adni_folder, "--max-steps", "6", "--resume", "--no-channels-last", *flags)
    whole, cut = ckpt(tmp_path / "whole" / "vqvae.pt"), ckpt(tmp_path / "cut" / "vqvae.pt")
    assert max((whole["model"][k].float() - cut["model"][k].float()).abs().max().item() for k in whole["model"]) < 0.05
