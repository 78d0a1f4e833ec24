"""
Benchmark of extract_roi.py's encoder step: images per second at several batch sizes (§A.5.2 encoding).

Measures `encode` of roi_encoder.SiglipPatches (the code extract_roi.py runs: no-grad, eval, last block
before post_layernorm; bf16 on GPU) on preprocessed random pixels, and separately the per-image CPU
preprocessing (pad to square, bicubic resize, normalise), which batching does not speed up.

    python bench/roi.py                          # tiny encoder (embedded/tiny.py), CPU, batch 1 and 16
    python bench/roi.py --real --device cuda     # SigLIP-SO400M/14-448 config (MedSigLIP size), random init

Prints a table; with --tiny the run fails (exit 1) if batch 16 is not at least 2x faster per image
than batch 1 (batching must pay off on the encoder step).
"""
import argparse
import os
import sys
import tempfile
import time

import numpy as np
import torch
from PIL import Image
from transformers import SiglipImageProcessorPil, SiglipVisionConfig, SiglipVisionModel

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root
from pipeline import roi_encoder as RE
from embedded.tiny import make_tiny


def real_encoder(folder):
    """MedSigLIP-448's architecture (SigLIP-SO400M/14-448) with random weights: no download needed."""
    cfg = SiglipVisionConfig(hidden_size=1152, num_hidden_layers=27, num_attention_heads=16,
                             intermediate_size=4304, image_size=448, patch_size=14)
    SiglipVisionModel(cfg).save_pretrained(folder)
    SiglipImageProcessorPil(size={"height": 448, "width": 448}, image_mean=[0.5] * 3, image_std=[0.5] * 3,
                            do_pad=False).save_pretrained(folder)
    return folder


def sync(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def images_per_second(enc, batch, n_images, device):
    x = torch.randn(batch, 3, enc.image_size, enc.image_size)
    enc.encode(x)  # warm-up (allocations, kernels)
    sync(device)
    n_calls = max(1, n_images // batch)
    t = time.perf_counter()
    for _ in range(n_calls):
        enc.encode(x)
    sync(device)
    return n_calls * batch / (time.perf_counter() - t)


def preprocess_per_second(enc, n=50):
    img = Image.fromarray(
        np.random.default_rng(0).integers(0, 255, (512, 384), dtype=np.uint8)).convert("RGB")
    t = time.perf_counter()
    for _ in range(n):
        enc.preprocess(RE.pad_image(img, (0, 0, 384, 512)))
    return n / (time.perf_counter() - t)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--real", action="store_true",
                   help="SigLIP-SO400M/14-448 config instead of the tiny encoder")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 16], help="batch sizes to time")
    p.add_argument("--images", type=int, default=None, help="images per timing (default 256 tiny, 64 real)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    n = args.images or (64 if args.real else 256)
    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    with tempfile.TemporaryDirectory() as tmp:
        folder = real_encoder(os.path.join(tmp, "enc")) if args.real \
            else os.path.join(make_tiny(tmp), "encoder")
        enc = RE.SiglipPatches(folder, args.device, dtype)
    name = "SigLIP-SO400M/14-448 (random)" if args.real else "tiny SigLIP (112 px, 8x8, d 48)"
    dev = torch.cuda.get_device_name() if args.device.startswith("cuda") \
        else f"CPU x{torch.get_num_threads()} threads"
    print(f"\nencoder: {name}; device: {dev}; dtype {dtype}; grid {enc.grid}x{enc.grid}, d_v {enc.dim}")
    print(f"{'batch':>6} | {'images/s':>10} | {'ms/image':>9} | {'speed-up vs batch 1':>20}")
    print("-" * 55)
    rates = {}
    for b in args.batches:
        rates[b] = images_per_second(enc, b, n, args.device)
        print(f"{b:>6} | {rates[b]:>10.1f} | {1000 / rates[b]:>9.2f} | "
              f"{rates[b] / rates[args.batches[0]]:>19.2f}x")
    print(f"CPU preprocessing (512x384 grey -> {enc.image_size} px): "
          f"{preprocess_per_second(enc):.1f} images/s")
    if not args.real and 1 in rates and 16 in rates and rates[16] < 2 * rates[1]:
        raise SystemExit(f"batch 16 is only {rates[16] / rates[1]:.2f}x faster per image than batch 1 (< 2x)")


if __name__ == "__main__":
    main()
