"""CPU preprocessing for the SAM 2 / SAM 2.1 Hiera encoders, without importing ``sam2``
(DataLoader workers import this; hydra and the model code stay in the main process).

``SAM2ImagePredictor.set_image`` runs ``SAM2Transforms``: ``ToTensor`` (uint8 HWC -> float
CHW / 255), ``Resize((1024, 1024))`` (bilinear, antialiased, and *not* keeping the aspect
ratio: SAM 2 stretches every image to a square, there is no padding), then ImageNet
``Normalize``. The same torchvision calls run here, in the same order and dtype, so the
tensors are equal to the predictor's.
"""
from __future__ import annotations

import numpy as np
import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from stages.encoders.preprocess import to_rgb, to_uint8_minmax

SAM2_PIXEL_MEAN = [0.485, 0.456, 0.406]
SAM2_PIXEL_STD = [0.229, 0.224, 0.225]

SAM2_PREPROCESSING = {
    "channels": "gray_to_rgb_drop_alpha",
    "to_uint8": "minmax_round_unless_uint8",
    "to_float": "divide_255",
    "resize": "square_bilinear_antialias_no_aspect",
    "target": 1024,
    "normalize": "mean_std",
    "pixel_mean": SAM2_PIXEL_MEAN,
    "pixel_std": SAM2_PIXEL_STD,
    "pad": "none",
}


def prepare_sam2(image: np.ndarray, size: int = 1024) -> torch.Tensor:
    """(H,W[,C]) any dtype -> (3,size,size) float32, as ``SAM2ImagePredictor.set_image``:
    uint8 RGB (other dtypes: min-max to 0..255 and rounded, as for SAM; gray repeated to
    RGB, alpha dropped), /255, bilinear antialiased resize to size x size, ImageNet
    mean/std."""
    rgb = to_uint8_minmax(to_rgb(image))
    # ToTensor: HWC -> CHW, contiguous, float32 / 255
    x = torch.from_numpy(np.ascontiguousarray(rgb.transpose(2, 0, 1))).contiguous().to(torch.float32).div(255)
    x = TF.resize(x, [size, size], interpolation=InterpolationMode.BILINEAR, antialias=True)
    return TF.normalize(x, SAM2_PIXEL_MEAN, SAM2_PIXEL_STD).contiguous()
