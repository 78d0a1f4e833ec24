"""
Training throughput of train.py (samples/s, tokens/s, peak memory), measured through the real training path:
each configuration runs `train.main` for a few optimizer steps on a synthetic five-tuple set and reads the
per-step numbers train.py writes to log.jsonl (the first steps are warm-up and are dropped).

    # tiny preset on this machine (CPU or GPU)
    python bench/train_speed.py
    # real sizes, random weights: Qwen3-VL-8B + Qwen3-1.7B, r=64, d_v=1152
    python bench/train_speed.py --real
    # the same widths with fewer layers (a quick check of the path)
    python bench/train_speed.py --real --layers 2

Reference: the paper's run is 817K sample-passes (19.6K x 5 + 39.4K x 5 + 52.2K x 10) in 96 h on 6 GPUs,
i.e. about 0.39 samples/s per GPU; the goal is >= 3x that per GPU at the same sizes.
"""
import argparse
import json
import os
import sys
import statistics
import tempfile

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root
import train
from embedded.tiny import make_tiny, real_configs

PAPER_SAMPLES_PER_S_PER_GPU = 817_000 / (96 * 3600) / 6  # = 0.394


def write_data(folder, n, K, image_size, d_v, seed=0):
    """n train samples with K reasoning steps each, grey images with a bright blob,
    random unit ROI features."""
    os.makedirs(os.path.join(folder, "images"), exist_ok=True)
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        a = (rng.random((image_size, image_size)) * 80).astype("uint8")
        c = rng.integers(image_size // 4, 3 * image_size // 4, size=2)
        a[c[0] - image_size // 8:c[0] + image_size // 8, c[1] - image_size // 8:c[1] + image_size // 8] = 220
        Image.fromarray(a).save(os.path.join(folder, "images", f"{i}.png"))
        chain = [f"step {k}: a bright round region lies in the center of the image." for k in range(K)]
        rows.append(dict(id=f"b{i}", image=f"images/{i}.png", split="train", latent_steps=K,
                         reasoning_chain=chain, question="where is the bright lesion located in the image?",
                         answer="the lesion lies in the center of the image."))
    with open(os.path.join(folder, "samples.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    feats = {k: F.normalize(torch.randn(n, d_v), dim=-1) for k in ("roi", "global")}
    save_file(feats, os.path.join(folder, "roi.safetensors"),
              metadata={"ids": json.dumps([r["id"] for r in rows])})


def make_real(folder, layers=None, dec_layers=None):
    """Random-weight Qwen3-VL-8B (LLM 4096 x 36, ViT 1152 x 27) and Qwen3-1.7B (2048 x 28) written as
    model folders.
    The tiny tokenizer (1024 tokens) is enough: token ids only need to be < the real vocab of 151936."""
    from transformers import Qwen2VLImageProcessorPil, Qwen3ForCausalLM, Qwen3VLForConditionalGeneration
    if os.path.isfile(os.path.join(folder, "decoder", "config.json")):
        return folder
    cfg, dcfg, _, tok = real_configs(layers, dec_layers)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    old = torch.get_default_dtype()
    # random init straight in bf16 on the device: 16 GB, seconds on a GPU
    torch.set_default_dtype(torch.bfloat16)
    try:
        for sub, make in (("backbone", lambda: Qwen3VLForConditionalGeneration(cfg)),
                          ("decoder", lambda: Qwen3ForCausalLM(dcfg))):
            with torch.device(dev):
                m = make()
            m.save_pretrained(os.path.join(folder, sub))
            tok.save_pretrained(os.path.join(folder, sub))
            del m
    finally:
        torch.set_default_dtype(old)
    Qwen2VLImageProcessorPil(patch_size=16, merge_size=2, temporal_patch_size=2, min_pixels=64 * 64,
                             max_pixels=448 * 448).save_pretrained(os.path.join(folder, "backbone"))
    return folder


def measure(tmp, name, model_flags, K, batch, steps, image_size, d_v, extra=()):
    """Run train.py for `steps` optimizer steps at one K; median over the steps after the first two."""
    data = os.path.join(tmp, f"data-{name}-K{K}-b{batch}")
    write_data(data, n=batch * steps, K=K, image_size=image_size, d_v=d_v)
    out = os.path.join(tmp, f"run-{name}-K{K}-b{batch}")
    train.main(["--data", data, "--out", out, "--phase", "3", "--init", "none", "--batch-size", str(batch),
                "--epochs", "1", "--save-every", "1000000", *model_flags, *extra])
    with open(os.path.join(out, "log.jsonl")) as f:
        log = [json.loads(l) for l in f][2:]
    return dict(config=name, K=K, batch=batch, steps=len(log),
                samples_per_s=statistics.median(e["samples_per_s"] for e in log),
                tokens_per_s=statistics.median(e["tokens_per_s"] for e in log),
                peak_mem_mib=max(e["peak_mem_mib"] for e in log))


def main():
    ap = argparse.ArgumentParser(description="training samples/s of train.py")
    ap.add_argument("--real", action="store_true",
                    help="real model sizes with random weights (needs a GPU to be useful)")
    ap.add_argument("--layers", type=int,
                    help="--real: LLM layers of backbone and decoder (default 36 and 28)")
    ap.add_argument("--models", default="runs/tiny", help="tiny model folder (made if absent)")
    ap.add_argument("--real-models", default="runs/bench-real",
                    help="where --real writes its random-weight models")
    ap.add_argument("--steps", type=int, default=8,
                    help="optimizer steps per configuration (2 more are warm-up)")
    ap.add_argument("--batch", type=int, nargs="+", help="per-device batch sizes (default 8 tiny, 4 8 real)")
    ap.add_argument("--ks", type=int, nargs="+", default=[1, 4], help="latent steps K to measure")
    args = ap.parse_args()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        if not args.real:
            if not os.path.isfile(os.path.join(args.models, "backbone", "config.json")):
                make_tiny(args.models)
            flags = ["--preset", "tiny", "--models", args.models]
            for K in args.ks:
                for b in args.batch or [8]:
                    rows.append(measure(tmp, "tiny", flags, K, b, args.steps + 2, 128, 48))
        else:
            folder = make_real(args.real_models + (f"-L{args.layers}" if args.layers else ""), args.layers,
                               args.layers)
            flags = ["--backbone", f"{folder}/backbone", "--decoder", f"{folder}/decoder"]
            for K in args.ks:
                for b in args.batch or [4, 8]:
                    rows.append(measure(tmp, "real" + (f"-L{args.layers}" if args.layers else ""), flags,
                                        K, b, args.steps + 2, 448, 1152))
    name = torch.cuda.get_device_name() if dev == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"\ntrain.py throughput on {name} (median over steps 3..; one process)")
    print(f"{'config':<10} {'K':>2} {'batch':>5} {'samples/s':>10} {'tokens/s':>10} {'peak MiB':>9} "
          f"{'vs paper/GPU':>12}")
    for r in rows:
        # The ratio to the paper only means something at the paper's sizes on a GPU.
        ratio = (f"{r['samples_per_s'] / PAPER_SAMPLES_PER_S_PER_GPU:.1f}x"
                 if r["config"] == "real" and dev == "cuda" else "-")
        print(f"{r['config']:<10} {r['K']:>2} {r['batch']:>5} {r['samples_per_s']:>10.2f} "
              f"{r['tokens_per_s']:>10.0f} {r['peak_mem_mib']:>9.0f} {ratio:>12}")
    print(f"paper: {PAPER_SAMPLES_PER_S_PER_GPU:.2f} samples/s per GPU (817K sample-passes, 96 h, 6 GPUs)")


if __name__ == "__main__":
    main()
