"""
The paper's model shapes with random weights, written as from_pretrained folders (backbone/, decoder/,
encoder/) that every stage loads exactly like real checkpoints: Qwen3-VL-8B (demo/tiny.real_configs: LLM
4096 wide, head_dim 128, M-RoPE sections 24/20/20, ViT 1152 x 27 with deepstack 8/16/24), Qwen3-1.7B and
SigLIP-448 (MedSigLIP's shape: 1152 wide, 448 px, patch 14, 32 x 32 patches). The LLMs and the SigLIP
tower keep only `layers` / `dec_layers` / `enc_layers` blocks; every width and vocabulary is real.

Random init of the full vocabularies (2 x 622M + 311M embedding entries) takes ~30 s on one CPU core with
torch's initialisers; here every matrix is filled from one pool of N(0, 0.02) numbers (a prime length, so
that rows do not repeat in step): memory speed. Norm gains are 1 and biases 0, as in a fresh model.

    python bench/real.py runs/real-L1 --layers 1          # -> runs/real-L1/{backbone,decoder,encoder}
"""
import argparse
import os
import sys

import torch
from transformers import (Qwen2VLImageProcessorPil, Qwen3ForCausalLM, Qwen3VLForConditionalGeneration,
                          SiglipImageProcessorPil, SiglipVisionModel)
from transformers.initialization import no_init_weights

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root
from embedded.tiny import real_configs  # noqa: E402

POOL = 1_000_003  # a prime: the pool never lines up with a row length


@torch.no_grad()
def fill(model, std=0.02, seed=0):
    """Weights ~ N(0, std) drawn from one pool, 1-D gains 1, biases 0 (buffers are left as built)."""
    pool = torch.randn(POOL, generator=torch.Generator().manual_seed(seed)) * std
    for name, p in model.named_parameters():
        flat = p.view(-1)
        if name.endswith("bias"):
            flat.zero_()
        elif p.ndim == 1:
            flat.fill_(1.0)
        else:
            src = pool.to(p.dtype)
            for i in range(0, flat.numel(), POOL):  # element e gets pool[e mod POOL]
                n = min(POOL, flat.numel() - i)
                flat[i:i + n].copy_(src[:n])
    return model


def build(make, dtype):
    """A model built without torch's (slow) initialisers, in `dtype`, then filled."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with no_init_weights():
            model = make()
    finally:
        torch.set_default_dtype(old)
    return fill(model)


def configs(layers=1, dec_layers=1, enc_layers=1, vision_depth=None):
    """real_configs with `layers`/`dec_layers` LLM blocks; the SigLIP-448 tower with `enc_layers` blocks;
    vision_depth (None = the real 27) must exceed the last deepstack index (24)."""
    cfg, dcfg, ecfg, tok = real_configs(layers, dec_layers)
    ecfg.num_hidden_layers = enc_layers
    if vision_depth is not None:
        if vision_depth <= max(cfg.vision_config.deepstack_visual_indexes):
            raise ValueError(f"vision depth {vision_depth} does not reach the deepstack layers "
                             f"{cfg.vision_config.deepstack_visual_indexes}")
        cfg.vision_config.depth = vision_depth
    return cfg, dcfg, ecfg, tok


def write_real_models(folder, layers=1, dec_layers=1, enc_layers=1, vision_depth=None):
    """-> folder with backbone/ (bf16), decoder/ (bf16 on disk; train.py loads it in fp32), encoder/."""
    subs = ("backbone", "decoder", "encoder")
    if all(os.path.isfile(os.path.join(folder, s, "config.json")) for s in subs):
        return folder
    cfg, dcfg, ecfg, tok = configs(layers, dec_layers, enc_layers, vision_depth)
    for sub, make in (("backbone", lambda: Qwen3VLForConditionalGeneration(cfg)),
                      ("decoder", lambda: Qwen3ForCausalLM(dcfg)),
                      ("encoder", lambda: SiglipVisionModel(ecfg))):
        model = build(make, torch.bfloat16)
        model.save_pretrained(os.path.join(folder, sub))
        del model
    for sub in ("backbone", "decoder"):
        tok.save_pretrained(os.path.join(folder, sub))
    # Qwen3-VL's processor: 16-px patches, 2 x 2 merge (one LLM token per 32 x 32 pixels), its own ~16.7 M
    # pixel cap (model.load_backbone applies the project's cap on top)
    Qwen2VLImageProcessorPil(patch_size=16, merge_size=2, temporal_patch_size=2, min_pixels=64 * 64,
                             max_pixels=16_777_216).save_pretrained(os.path.join(folder, "backbone"))
    SiglipImageProcessorPil(size={"height": 448, "width": 448}, image_mean=[0.5] * 3, image_std=[0.5] * 3,
                            do_pad=False).save_pretrained(os.path.join(folder, "encoder"))
    return folder


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folder", help="output folder")
    ap.add_argument("--layers", type=int, default=1, help="LLM blocks of the backbone (real: 36)")
    ap.add_argument("--dec-layers", type=int, default=1, help="blocks of the decoder (real: 28)")
    ap.add_argument("--enc-layers", type=int, default=1, help="blocks of the SigLIP encoder (real: 27)")
    args = ap.parse_args()
    write_real_models(args.folder, args.layers, args.dec_layers, args.enc_layers)
    print(f"random-weight real-shape models in {args.folder}/{{backbone,decoder,encoder}}")


if __name__ == "__main__":
    main()
