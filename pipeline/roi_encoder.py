"""
The frozen vision encoder of the ROI targets and its square patch grid, shared by extract_roi.py (the L_vis
targets), explain.py (the visual window) and evaluate.py (the pointing game):

    1. the square frame    an image region or a mask padded to a centred square with zeros, and the share of
                           each patch of the (g, g) grid that a region covers
    2. the encoders        preprocess(square PIL) -> pixels; encode(pixels (B, ...)) -> patch features
                           (B, g*g, d): a SigLIP tower (MedSigLIP-448) or the backbone's own (§C.3)
    3. heatmaps            the full image's patch features and their cosine with projected latent states

Which features, which preprocessing, and the self-encoder's merged tokens: extract_roi.py's docstring.
"""
import os

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from pipeline import io as IO


# ----------------------------------------------------------------------------------------------------
# 1. The square frame: the image and its mask are padded alike, so both live on one patch grid.
# ----------------------------------------------------------------------------------------------------
def square_pad(a):
    """(h, w) array -> (s, s) float tensor, s = max(h, w), content centred, zeros elsewhere. The image
    is padded the same way (pad_image), so both live in the same square frame."""
    h, w = a.shape
    s = max(h, w)
    out = torch.zeros(s, s)
    oy, ox = (s - h) // 2, (s - w) // 2
    out[oy:oy + h, ox:ox + w] = torch.as_tensor(np.asarray(a, dtype=np.float32))
    return out


def grid_fraction(a_sq, g):
    """(s, s) float -> (g*g,) fraction of each patch that a_sq covers. F.interpolate(mode='area') is
    adaptive average pooling, so it is exact also when s is not a multiple of g."""
    return F.interpolate(a_sq[None, None], size=(g, g), mode="area")[0, 0].flatten()


def pad_image(img, box):
    """Crop `box` out of the RGB image and centre it on a black square (zeros, as MedSigLIP's padding)."""
    x0, y0, x1, y1 = box
    crop = img.crop(box)
    s = max(x1 - x0, y1 - y0)
    sq = Image.new("RGB", (s, s))
    sq.paste(crop, ((s - (x1 - x0)) // 2, (s - (y1 - y0)) // 2))
    return sq


# ----------------------------------------------------------------------------------------------------
# 2. Encoders: preprocess(square PIL) -> pixels; encode(pixels (B, ...)) -> patch features (B, g*g, d).
# ----------------------------------------------------------------------------------------------------
class SiglipPatches:
    """Frozen SigLIP vision tower (MedSigLIP-448 in the paper), loaded with pipeline.io.load_encoder."""
    kind = "siglip"

    def __init__(self, path, device="cpu", dtype=torch.float32):
        self.model, proc = IO.load_encoder(path, dtype, device)
        cfg = self.model.config
        self.name, self.path = os.path.basename(os.path.normpath(path)), path
        self.device, self.dtype = device, dtype
        self.image_size, self.dim = cfg.image_size, cfg.hidden_size
        self.grid = cfg.image_size // cfg.patch_size
        self.mean = torch.tensor(proc.image_mean).view(3, 1, 1)
        self.std = torch.tensor(proc.image_std).view(3, 1, 1)
        self.resample = proc.resample  # bicubic for SigLIP

    def preprocess(self, sq):
        """square RGB PIL -> (3, R, R) normalised float tensor."""
        im = sq.resize((self.image_size, self.image_size), resample=self.resample)
        x = torch.from_numpy(np.asarray(im, dtype=np.float32)).permute(2, 0, 1) / 255.0
        return (x - self.mean) / self.std

    @torch.no_grad()
    def encode(self, x):
        out = self.model(pixel_values=x.to(self.device, self.dtype), output_hidden_states=True)
        return out.hidden_states[-1].float().cpu()  # (B, g*g, d): last block, before post_layernorm


class QwenSelfPatches:
    """The backbone's own vision tower (§C.3 self-referential ablation): merged tokens = LLM image tokens."""
    kind = "self"

    def __init__(self, path, size=448, device="cpu", dtype=torch.float32):
        backbone, proc = IO.load_backbone(path, dtype, device)
        self.visual, self.ip = backbone.model.visual.requires_grad_(False), proc.image_processor
        unit = self.ip.patch_size * self.ip.merge_size  # 16 px x 2x2 merge = 32 px per token
        if size % unit:
            raise ValueError(f"--self-size {size} must be a multiple of {unit} (patch {self.ip.patch_size} "
                             f"x merge {self.ip.merge_size})")
        self.name, self.path = os.path.basename(os.path.normpath(path)), path
        self.device, self.dtype = device, dtype
        self.image_size, self.grid = size, size // unit
        self.dim = self.visual.config.out_hidden_size

    def preprocess(self, sq):
        """square RGB PIL -> (g*g*merge^2, C*T*P*P) flattened patches in the processor's merge order."""
        im = sq.resize((self.image_size, self.image_size), resample=Image.BICUBIC)
        out = self.ip(images=[im], return_tensors="pt")
        thw = out["image_grid_thw"][0].tolist()
        m = self.ip.merge_size
        if thw != [1, self.grid * m, self.grid * m]:
            raise RuntimeError(f"processor gave grid {thw} for a {self.image_size}px square; expected "
                               f"[1, {self.grid * m}, {self.grid * m}] (check its min/max pixels)")
        return out["pixel_values"]

    @torch.no_grad()
    def encode(self, x):
        B, m = x.shape[0], self.ip.merge_size
        thw = torch.tensor([[1, self.grid * m, self.grid * m]] * B)
        out = self.visual(x.flatten(0, 1).to(self.device, self.dtype), grid_thw=thw)
        # pooler_output: merged tokens, row-major over the (g, g) grid of 2x2 patch blocks
        return out.pooler_output.float().cpu().view(B, self.grid * self.grid, self.dim)


def build_encoder(kind, path, device, self_size=448):
    """--encoder-kind siglip|self -> the frozen encoder, bf16 on a GPU."""
    dtype = torch.bfloat16 if str(device).startswith("cuda") else torch.float32
    if kind == "self":
        return QwenSelfPatches(path, self_size, device, dtype)
    return SiglipPatches(path, device, dtype)


# ----------------------------------------------------------------------------------------------------
# 3. Heatmaps: where a projected latent state VP(h_k) points on the full image (§C.7).
# ----------------------------------------------------------------------------------------------------
def patch_features(enc, image):
    """The full image encoded as extract_roi.py encodes it: pad to a square with zeros (centred), preprocess,
    encode. -> (g*g, d_v) features, and the image's box inside the square (x0, y0, x1, y1) in square px."""
    W, H = image.size
    sq = pad_image(image, (0, 0, W, H))
    s = sq.size[0]
    f = enc.encode(enc.preprocess(sq)[None])[0]                                             # (g*g, d_v)
    ox, oy = (s - W) // 2, (s - H) // 2
    return f, (ox, oy, ox + W, oy + H), s


def heatmaps(f, v, g):
    """cos(VP(h_k), patch) for every step and patch: f (g*g, d_v), v (K, d_v) L2-normalised -> (K, g, g)."""
    return (F.normalize(f.float(), dim=-1) @ v.float().T).T.reshape(-1, g, g)
