"""
The tiny backbone's stand-in for the pretraining a real Qwen3-VL arrives with (demo only; a real run
skips it).

A random tiny backbone cannot see: its frozen vision tower does not pass on where a shaped target sits on a
textured background (docs/tuning-log.md has the bisection). So before VITAL freezes it, the demo trains the
WHOLE tiny backbone (vision tower, merger, LLM, embeddings, head; no LoRA, no scaffolds) to answer directly
(K = 0) on phantom images of another seed, and saves it as a from_pretrained folder. It is train.py's own
phase (train.train_phase: data, DDP, resume, logging) with two parts swapped in: the model builder and an
extra checkpoint folder holding the backbone.

    python prepare_data.py --source phantom --out runs/demo/pretrain_data --n 3000 --seed 1 --image-size 96 \\
        --test-frac 0 --val-frac 0 --captions        # (then again with --questions-per-image 2: appends)
    python demo/pretrain.py --data runs/demo/pretrain_data --models runs/demo/models \\
        --out runs/demo/pretrain --epochs 6 --lr 2e-3
    -> runs/demo/pretrain/phase1/backbone/ (train VITAL with --backbone pointing there), phase1/config.json,
       trainer/ (add --resume to continue a killed run exactly)
The demo does not run this (8 min on one core): it copies the result shipped in embedded/pretrained/pretrain/,
made by these commands (embedded/pretrained/stand_ins.json); `demo/run.py --rebuild-stand-ins` runs them.
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root
import model as M  # noqa: E402
from pipeline import io as IO  # noqa: E402
import train  # noqa: E402


def build_pretrain(args, env, resume_dir, d_v):
    """The whole backbone trainable in fp32, no LoRA, no scaffolds. A resume starts from the checkpoint's
    own copy of the backbone (that is what trains)."""
    start = os.path.join(resume_dir, "backbone") if resume_dir else args.backbone
    backbone, processor = IO.load_backbone(start, dtype=torch.float32, device=env.device)
    backbone.requires_grad_(True)
    vital = M.VITAL(backbone, None, None, lambda_sem=0.0, lambda_vis=0.0).to(env.device)
    return vital, processor, None, dict(backbone=IO.fingerprint(args.backbone), decoder=None, lora=None)


def save_backbone(raw, processor):
    """The trained backbone as a from_pretrained folder inside every checkpoint
    (its adapter file is empty)."""
    return {"backbone": lambda path: (raw.backbone.save_pretrained(path), processor.save_pretrained(path))}


def get_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True,
                    help="folder with samples.jsonl (every train item is used, at K = 0)")
    ap.add_argument("--models", default="runs/tiny",
                    help="tiny models folder (embedded/tiny.py); its backbone is trained")
    ap.add_argument("--out", required=True, help="run folder: the checkpoint goes to <out>/phase1")
    ap.add_argument("--epochs", type=float, default=6,
                    help="epochs over the corpus (the demo's 6: 4 at lr 3e-3 left the backbone alone at "
                         "29.7%% on the phantom test, 6 at 52.2%%; README, Results)")
    ap.add_argument("--lr", type=float, default=2e-3, help="peak learning rate")
    ap.add_argument("--batch-size", type=int, default=8, help="samples per micro-batch")
    ap.add_argument("--seed", type=int, default=0, help="seed of data order and dropout (the demo's 0)")
    ap.add_argument("--max-steps", type=int, default=0,
                    help="stop after this step (the lr schedule spans the run)")
    ap.add_argument("--save-every", type=int, default=500, help="checkpoint every N optimizer steps")
    ap.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    a = ap.parse_args(argv)
    # train.py's flags for one phase over every train item (full-mix phase 1), answered directly (K = 0),
    # with neither scaffold; `pretrain` is recorded in config.json so that evaluate.py reads the checkpoint
    # as the backbone alone.
    args = train.get_args(["--data", a.data, "--preset", "tiny", "--models", a.models, "--out", a.out,
                           "--curriculum", "full-mix", "--phase", "1", "--epochs", str(a.epochs),
                           "--max-k", "0", "--lambda-sem", "0", "--lambda-vis", "0", "--lr", str(a.lr),
                           "--batch-size", str(a.batch_size), "--seed", str(a.seed),
                           "--max-steps", str(a.max_steps),
                           "--save-every", str(a.save_every)] + (["--resume"] if a.resume else []))
    args.pretrain = True
    return args


def main(argv=None):
    phase_dir = train.main(get_args(argv), build=build_pretrain, extra_files=save_backbone)
    print(f"pretrained backbone: {os.path.join(phase_dir, 'backbone')} "
          "(train VITAL with --backbone pointing there)")


if __name__ == "__main__":
    try:
        main()
    except train.TrainError as e:
        sys.exit(f"pretrain.py: error: {e}")
