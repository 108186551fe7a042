"""Reading encoder checkpoints safely.

Every file goes through ``torch.load(weights_only=True)``: PyTorch's restricted unpickler
only rebuilds tensors and plain containers, so a crafted pickle cannot run code. A file
it refuses, a truncated file or one holding something else than a state dict becomes an
``EncoderError`` naming the file.
"""
from __future__ import annotations

import hashlib
import pickle
from pathlib import Path

import torch

from stages.encoders.base import EncoderError

_SAM_URL = "https://dl.fbaipublicfiles.com/segment_anything/"
_SAM2_URL = "https://dl.fbaipublicfiles.com/segment_anything_2/092824/"
#: name -> (download url, sha256, file name) of the official SAM and SAM 2.1 checkpoints
OFFICIAL: dict[str, tuple[str, str, str]] = {
    "vit_b": (
        _SAM_URL + "sam_vit_b_01ec64.pth",
        "ec2df62732614e57411cdcf32a23ffdf28910380d03139ee0f4fcbe91eb8c912",
        "sam_vit_b_01ec64.pth",
    ),
    "vit_l": (
        _SAM_URL + "sam_vit_l_0b3195.pth",
        "3adcc4315b642a4d2101128f611684e8734c41232a17c648ed1693702a49a622",
        "sam_vit_l_0b3195.pth",
    ),
    "vit_h": (
        _SAM_URL + "sam_vit_h_4b8939.pth",
        "a7bf3b02f3ebf1267aba913ff637d9a2d5c33d3173bb679e46d9f338c26f262e",
        "sam_vit_h_4b8939.pth",
    ),
    # SAM 2.1 (Sept 2024) Hiera checkpoints; the hashes are those many projects pin for
    # these URLs (Meta publishes none)
    "sam2_hiera_t": (
        _SAM2_URL + "sam2.1_hiera_tiny.pt",
        "7402e0d864fa82708a20fbd15bc84245c2f26dff0eb43a4b5b93452deb34be69",
        "sam2.1_hiera_tiny.pt",
    ),
    "sam2_hiera_s": (
        _SAM2_URL + "sam2.1_hiera_small.pt",
        "6d1aa6f30de5c92224f8172114de081d104bbd23dd9dc5c58996f0cad5dc4d38",
        "sam2.1_hiera_small.pt",
    ),
    "sam2_hiera_b+": (
        _SAM2_URL + "sam2.1_hiera_base_plus.pt",
        "a2345aede8715ab1d5d31b4a509fb160c5a4af1970f199d9054ccfb746c004c5",
        "sam2.1_hiera_base_plus.pt",
    ),
    "sam2_hiera_l": (
        _SAM2_URL + "sam2.1_hiera_large.pt",
        "2647878d5dfa5098f2f8649825738a9345572bae2d4350a2468587ece47dd318",
        "sam2.1_hiera_large.pt",
    ),
}

_SHA_CACHE: dict[tuple[str, int, int], str] = {}


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file, cached per (resolved path, size, mtime) so that hashing a
    2.5 GB checkpoint happens once per process."""
    p = Path(path).resolve()
    st = p.stat()
    key = (str(p), st.st_size, st.st_mtime_ns)
    if key not in _SHA_CACHE:
        h = hashlib.sha256()
        with p.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        _SHA_CACHE[key] = h.hexdigest()
    return _SHA_CACHE[key]


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a checkpoint file on the CPU; unwraps ``{"model": ...}`` and
    ``{"state_dict": ...}`` (training checkpoints)."""
    p = Path(path)
    if not p.is_file():
        raise EncoderError(f"checkpoint {p} not found")
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise EncoderError(
            f"checkpoint {p} is not a weights-only checkpoint (refused to unpickle it: "
            f"{first[:160]}); save a state dict with torch.save(model.state_dict(), path)"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError, KeyError, IndexError) as e:
        raise EncoderError(
            f"cannot read checkpoint {p} ({type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}); "
            "the file is truncated or not a PyTorch checkpoint: download it again"
        ) from None
    for key in ("model", "state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not obj or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    ):
        raise EncoderError(
            f"checkpoint {p} does not hold a state dict (a mapping of names to tensors); "
            "save one with torch.save(model.state_dict(), path)"
        )
    return obj


def sub_state(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """Entries under ``prefix`` (e.g. ``"image_encoder."``), with the prefix removed."""
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def sam_decoder_state(path: str | Path) -> dict[str, torch.Tensor]:
    """The ``mask_decoder.*`` weights of a SAM-family checkpoint, prefix removed, ready for
    ``MaskDecoder.load_state_dict``."""
    state = sub_state(load_state_dict(path), "mask_decoder.")
    if not state:
        raise EncoderError(
            f"checkpoint {path} has no mask_decoder.* weights; pass a whole-SAM checkpoint "
            "such as sam_vit_b_01ec64.pth or medsam_vit_b.pth"
        )
    return state
