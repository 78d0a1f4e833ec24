"""
VITAL stage 3: curriculum training of the LoRA + scaffolds (paper §3.5, §4.1, §B.3,
ablations §4.3, §C.1-C.5).

Reads  DATA/samples.jsonl (train split only) + DATA/roi.safetensors (the L_vis targets, extract_roi.py).
Writes runs/<name>/phase<p>/  adapter.safetensors, scaffold.safetensors, config.json, trainer/ (for --resume)
       runs/<name>/log.jsonl   one line per optimizer step (step, phase, losses, lr, grad norm, speed, memory)

Data first (stages 1-2), here the embedded phantom set with the tiny models:
    python embedded/tiny.py runs/tiny && python prepare_data.py --source phantom --out data/phantom --n 2000
    python extract_roi.py --samples data/phantom/samples.jsonl --encoder runs/tiny/encoder \\
        --out data/phantom/roi.safetensors
One process (a GPU, or the CPU), the three phases of the default curriculum, each warm-starting from the last:
    python train.py --data data/phantom --preset tiny --out runs/tiny-vital --phase 1
    python train.py --data data/phantom --preset tiny --out runs/tiny-vital --phase 2
    python train.py --data data/phantom --preset tiny --out runs/tiny-vital --phase 3
Real models, 6 GPUs on one node (the paper's setting):
    torchrun --standalone --nproc_per_node=6 train.py --data data/vital \\
        --backbone ckpt/Qwen3-VL-8B-Instruct --decoder ckpt/Qwen3-1.7B --out runs/vital --phase 1
Several nodes (run on every node, same rendezvous endpoint; global batch = batch x accum x world size):
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv-backend=c10d --rdzv-endpoint=HOST:29500 --rdzv-id=vital \\
        train.py --data data/vital --backbone ... --decoder ... --out runs/vital --phase 1
Continue a killed run exactly where its last checkpoint left it:   add --resume to the same command.
Memory per GPU at real size for a command's flags (README "Real scale"; nothing is loaded):
    python train.py --plan --phase 3            # the defaults: batch 8, images <= 448 x 448 px (--max-pixels)
    python train.py --plan --phase 3 --grad-ckpt --batch-size 32   # activation checkpointing: same gradients
Phase p > 1 from scratch or from another run: --init none | --init runs/other/phase1.
The tiny preset's stand-in for the pretraining a real Qwen3-VL arrives with is demo/pretrain.py (it reuses
train_phase below with its own model builder).
Ablations: --curriculum {3-phase,2-phase,full-mix,reverse}  --lambda-sem 0  --lambda-vis 0  --projector linear
           --visual-target per_step  --max-k 0 (direct-answer baseline) ... --max-k 4.
Depth parity (issue 12): --depth phase (default) runs every item of a phase at the phase's largest K (see
select_phase); --depth own runs each item at its own chain length.
Closed-ended prompts (§B.4): --options-rate P (default 0.5) asks an item that has choices with its options
(model.ask, as evaluate.py asks it) in a share P of its epochs, its target then the chosen option's text.
"""
import argparse
import glob as globmod
import hashlib
import json
import math
import os
import resource
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist
from PIL import Image, ImageDraw
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from embedded.tiny import make_tiny
from activation_checkpointing import set_checkpointing
from model import VITAL, add_lora
from pipeline_io import (MAX_PIXELS, ask, batch_to, choices_problem, file_sha256, fingerprint, load_backbone,
                         load_checkpoint, load_decoder, load_image, make_batch, save_checkpoint)

# ----------------------------------------------------------------------------------------------------
# Curriculum schedules (§3.5, §4.3 Table 3). Each phase = (highest latent_steps admitted, None = all K;
# default epochs). --depth own: a sample runs at its own K = min(latent_steps, --max-k); --depth phase:
# every sample runs the phase's largest K (the "highest" column, capped by --max-k), see select_phase.
#   schedule  | phase 1          | phase 2          | phase 3
#   3-phase   | K = 1, 5 ep      | K <= 2, 5 ep     | all K, 10 ep     (paper default, §4.1/§B.3)
#   2-phase   | K <= 2, 10 ep    | all K, 10 ep     |                  (chosen: same 20 epochs in total)
#   full-mix  | all K, 20 ep     |                  |                  (chosen: same 20 epochs in total)
#   reverse   | all K, 10 ep     | K <= 2, 5 ep     | K = 1, 5 ep      (chosen: 3-phase played backwards)
# ----------------------------------------------------------------------------------------------------
CURRICULA = {
    "3-phase": [(1, 5), (2, 5), (None, 10)],
    "2-phase": [(2, 10), (None, 10)],
    "full-mix": [(None, 20)],
    "reverse": [(None, 10), (2, 5), (1, 5)],
}
ROOT = os.path.dirname(os.path.abspath(__file__))  # the repository root (the embedded default's home)
REQUIRED = {"id": str, "image": str, "question": str, "answer": str, "reasoning_chain": list,
            "latent_steps": int, "split": str}


class TrainError(Exception):
    """A problem with the inputs or the run folder, reported as one clear message (no traceback)."""


def get_args(argv=None):
    ap = argparse.ArgumentParser(description="VITAL curriculum training (paper §3.5)")
    # data
    ap.add_argument("--data", help="folder with samples.jsonl and roi.safetensors (none: the embedded "
                                   "default, the demo's phantom data and tiny models under runs/demo, "
                                   "made if absent; $VITAL_DEMO_DIR moves it)")
    ap.add_argument("--limit", type=int, default=0,
                    help="use only the first N train samples of the phase (0 = all)")
    ap.add_argument("--options-rate", type=float, default=0.5,
                    help="share of the items with choices asked with their options in the prompt (model.ask; "
                         "the answer target is then the chosen option's text), drawn per item and epoch by a "
                         "hash of (seed, phase, id, epoch); evaluate.py asks with options (§B.4). 0 = never")
    # models
    ap.add_argument("--preset", choices=["tiny"],
                    help="tiny: tiny models of the real classes in --models (made if absent)")
    ap.add_argument("--models", default="runs/tiny",
                    help="folder of the tiny preset's backbone/decoder/encoder")
    ap.add_argument("--backbone", help="Qwen3-VL model folder (e.g. Qwen3-VL-8B-Instruct)")
    ap.add_argument("--decoder", help="auxiliary text decoder folder (e.g. Qwen3-1.7B)")
    ap.add_argument("--lora-r", type=int, help="LoRA rank (default 64, paper; 8 with --preset tiny)")
    ap.add_argument("--lora-alpha", type=float, help="LoRA alpha (default 128; 16 with --preset tiny)")
    ap.add_argument("--lora-dropout", type=float, default=0.05, help="dropout on the LoRA input (§B.3)")
    ap.add_argument("--projector", default="res_mlp_ln",
                    choices=["linear", "mlp", "mlp_ln", "res_mlp_ln", "transformer"],
                    help="visual projector variant (§C.2, Table 13)")
    ap.add_argument("--vp-dropout", type=float, default=0.1, help="dropout inside the visual projector")
    # curriculum
    ap.add_argument("--phase", type=int, default=1, help="curriculum phase to train (1-based)")
    ap.add_argument("--curriculum", default="3-phase", choices=list(CURRICULA),
                    help="schedule (§4.3, table above)")
    ap.add_argument("--epochs", type=float, help="epochs of this phase (default from the schedule: 5/5/10)")
    ap.add_argument("--max-k", type=int,
                    help="cap on latent steps: K = min(latent_steps, max_k); 0 = direct answer")
    ap.add_argument("--depth", default="phase", choices=["own", "phase"],
                    help="latent steps per item. phase (default): every item runs the phase's largest K = "
                         "min(its cap, or its longest chain for 'all K'; --max-k), as inference runs one K for "
                         "all; steps past an item's chain get L_vis (eq. 6) but no L_sem (eq. 4: valid steps). "
                         "own: K = min(latent_steps, --max-k) (demo/evidence.md compares the two)")
    ap.add_argument("--init",
                    help="warm-start checkpoint (default runs/<name>/phase<p-1> for p > 1; 'none' = scratch)")
    # losses (eq. 7)
    ap.add_argument("--lambda-sem", type=float, default=1.0,
                    help="weight of L_sem; 0 removes the decoder scaffold")
    ap.add_argument("--lambda-vis", type=float, default=0.1,
                    help="weight of L_vis; 0 removes the visual projector")
    ap.add_argument("--visual-target", default="shared", choices=["shared", "per_step"],
                    help="L_vis target (§C.5)")
    # optimisation
    ap.add_argument("--batch-size", type=int, default=8, help="samples per micro-batch per device")
    ap.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step per device")
    ap.add_argument("--lr", type=float, default=1e-4, help="peak learning rate (LoRA and scaffolds)")
    ap.add_argument("--lr-decoder", type=float,
                    help="peak learning rate of the auxiliary decoder (default --lr)")
    ap.add_argument("--weight-decay", type=float, default=0.01,
                    help="AdamW weight decay (not on biases and norms)")
    ap.add_argument("--warmup", type=float, default=0.05,
                    help="fraction of the phase's steps with linear warmup")
    ap.add_argument("--grad-clip", type=float, default=1.0, help="max global grad norm (0 = off)")
    # run
    ap.add_argument("--out", default="runs/vital", help="run folder runs/<name>; phases go to <out>/phase<p>")
    ap.add_argument("--save-every", type=int, default=500,
                    help="checkpoint every N optimizer steps (and at the end)")
    ap.add_argument("--resume", action="store_true", help="continue this phase from its last checkpoint")
    ap.add_argument("--max-steps", type=int, default=0,
                    help="stop after this step (the lr schedule still spans the phase)")
    ap.add_argument("--seed", type=int, default=1337,
                    help="seed of init, data order and dropout (rank r uses seed+r)")
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="where to train")
    ap.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16"],
                    help="autocast dtype (auto: bf16 on CUDA)")
    # memory (README "Real scale"; --plan prints what a command needs per GPU)
    ap.add_argument("--max-pixels", type=int, default=MAX_PIXELS,
                    help="cap on an image's pixels after the processor's resize (default 448 x 448 = 196 "
                         "visual tokens, the ROI encoder's resolution: model.MAX_PIXELS says why; 0 = the "
                         "backbone folder's own cap, ~16.7M for Qwen3-VL)")
    ap.add_argument("--grad-ckpt", action="store_true",
                    help="activation checkpointing of every text decoder layer, cache-safe "
                         "(activation_checkpointing.py): the same gradients, several times fewer saved "
                         "activations, each layer's forward runs twice")
    ap.add_argument("--plan", action="store_true",
                    help="print this command's per-GPU memory budget at the paper's model sizes (built on "
                         "the meta device, nothing loaded; --backbone/--decoder configs if given) and exit")
    ap.add_argument("--plan-world", type=int, default=6, help="--plan: GPUs (DDP ranks; the paper: 6)")
    ap.add_argument("--plan-gib", type=float, default=79.6,
                    help="--plan: memory of one GPU in GiB (79.6 = an 80 GB H100)")
    args = ap.parse_args(argv)
    args.embedded = args.data is None and not args.plan  # --plan reads no data and builds nothing
    if args.embedded:
        if args.backbone or args.decoder or args.preset:
            ap.error("give --data with --backbone/--decoder/--preset (a real run names its folders)")
        embedded_default(args)
    if args.preset == "tiny":
        args.backbone = args.backbone or os.path.join(args.models, "backbone")
        args.decoder = args.decoder or os.path.join(args.models, "decoder")
    if not args.backbone and not args.plan:
        ap.error("give --backbone (and --decoder) or --preset tiny")
    if args.lambda_sem > 0 and args.max_k != 0 and not args.decoder and not args.plan:
        ap.error("--lambda-sem > 0 needs the auxiliary --decoder (or --lambda-sem 0 to train without it)")
    tiny = args.preset == "tiny"
    args.lora_r = args.lora_r or (8 if tiny else 64)  # hidden 64 in the tiny models: r=64 would be full rank
    args.lora_alpha = args.lora_alpha or (16.0 if tiny else 128.0)
    schedule = CURRICULA[args.curriculum]
    if not 1 <= args.phase <= len(schedule):
        ap.error(f"--curriculum {args.curriculum} has phases 1..{len(schedule)}, not {args.phase}")
    args.phase_max_k, default_epochs = schedule[args.phase - 1]
    args.epochs = default_epochs if args.epochs is None else args.epochs
    if not 0 <= args.options_rate <= 1:
        ap.error(f"--options-rate must be in [0, 1], got {args.options_rate}")
    return args


def embedded_default(args):
    """No --data: train on the demo's phantom data with its tiny models (runs/demo in the repository, or
    $VITAL_DEMO_DIR), on the demo's pretrained tiny backbone (the run folder's, else the one shipped in
    embedded/pretrained/; a random tiny backbone cannot see). Missing data is made by the demo's own commands
    (make_embedded_default)."""
    base = os.path.abspath(os.environ.get("VITAL_DEMO_DIR") or os.path.join(ROOT, "runs", "demo"))
    args.preset, args.models, args.data = "tiny", os.path.join(base, "models"), os.path.join(base, "data")
    args.backbone = next((p for p in (os.path.join(base, "pretrain", "phase1", "backbone"),
                                      os.path.join(ROOT, "embedded", "pretrained", "pretrain", "phase1", "backbone"))
                          if os.path.isfile(os.path.join(p, "config.json"))), None)


def make_embedded_default(args, env):
    """Rank 0 writes the tiny models, the phantom data and the ROI features with demo/run.py's commands
    if they are missing; the other ranks wait for it."""
    if env.master and not os.path.isfile(os.path.join(args.data, "roi.safetensors")):
        from demo import run as demo_run
        env.log(f"no --data: making the embedded default (tiny models, phantom data, ROI features) in "
                f"{os.path.dirname(args.data)}")
        demo_run.make_embedded_default(args.models, args.data)
    if env.world > 1:
        dist.barrier()


# ----------------------------------------------------------------------------------------------------
# Data: samples.jsonl (written by prepare_data.py; fields: REQUIRED above) + roi.safetensors (extract_roi.py).
# Every problem names the file, line and field.
# ----------------------------------------------------------------------------------------------------
def read_samples(path):
    """All records of a samples.jsonl, validated; each gets `line` and an absolute `image_path`."""
    if not os.path.isfile(path):
        raise TrainError(f"{path}: no such file (run prepare_data.py first)")
    records, seen = [], {}
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                r = json.loads(line)
            except json.JSONDecodeError as e:
                raise TrainError(f"{path} line {n}: not valid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(r, dict):
                raise TrainError(f"{path} line {n}: expected a JSON object, got {type(r).__name__}")
            for field, typ in REQUIRED.items():
                if field not in r:
                    raise TrainError(f"{path} line {n}: missing field '{field}'")
                if not isinstance(r[field], typ) or (typ is int and isinstance(r[field], bool)):
                    raise TrainError(f"{path} line {n}: field '{field}' should be {typ.__name__}, "
                                     f"got {type(r[field]).__name__}")
            problem = choices_problem(r)
            if problem:
                raise TrainError(f"{path} line {n}: {problem}")
            if r["latent_steps"] != len(r["reasoning_chain"]):
                raise TrainError(f"{path} line {n}: latent_steps = {r['latent_steps']} "
                                 f"but reasoning_chain has {len(r['reasoning_chain'])} steps")
            if r["id"] in seen:
                raise TrainError(f"{path} line {n}: id '{r['id']}' already used on line {seen[r['id']]}")
            seen[r["id"]] = n
            r["line"] = n
            r["image_path"] = os.path.join(os.path.dirname(os.path.abspath(path)), r["image"])
            records.append(r)
    return records


def select_phase(records, args, path):
    """Train split, phase filter on latent_steps, then each sample's K; an empty phase is an error."""
    train = [r for r in records if r["split"] == "train"]
    hi = args.phase_max_k
    chosen = [r for r in train if r["latent_steps"] >= 1 and (hi is None or r["latent_steps"] <= hi)]
    if not chosen:
        counts = {}
        for r in train:
            counts[r["latent_steps"]] = counts.get(r["latent_steps"], 0) + 1
        want = "all K >= 1" if hi is None else f"1 <= latent_steps <= {hi}"
        raise TrainError(f"phase {args.phase} of --curriculum {args.curriculum} ({want}) has no train "
                         f"samples in {path} (train samples by latent_steps: "
                         f"{dict(sorted(counts.items())) or 'none'})")
    chosen = chosen[:args.limit] if args.limit > 0 else chosen
    # --depth phase: inference runs one K for every item, so training runs the phase's largest K for every
    # item too; a shorter chain leaves its later steps without a sentence (tokenize_steps pads them, L_sem
    # skips them: eq. 4 averages the valid steps; L_vis still counts them, see train_loop).
    top = hi if hi is not None else max(r["latent_steps"] for r in chosen)
    for r in chosen:
        k = top if args.depth == "phase" else r["latent_steps"]
        r["K"] = k if args.max_k is None else min(k, args.max_k)
    missing = [r["image_path"] for r in chosen if not os.path.isfile(r["image_path"])]
    if missing:
        raise TrainError(f"{len(missing)} images named in {path} do not exist, e.g. {missing[:3]}")
    return chosen


def read_roi(path, records, need_global):
    """ROI targets (N, d_v) and global features in the order of `records`, and the file's metadata (which
    encoder made them: explain.py re-attaches it); lists ids without a feature."""
    if not os.path.isfile(path):
        raise TrainError(f"{path}: no such file (run extract_roi.py first, or train with --lambda-vis 0)")
    with safe_open(path, "pt") as f:
        meta = f.metadata() or {}
        if "ids" not in meta:
            raise TrainError(f"{path}: metadata has no 'ids' list (row order of the features)")
        ids = json.loads(meta["ids"])
        names = set(f.keys())
        for name in ["roi"] + (["global"] if need_global else []):
            if name not in names:
                raise TrainError(f"{path}: no tensor '{name}'"
                                 + (" (needed by --visual-target per_step)" if name == "global" else ""))
        roi = f.get_tensor("roi").float()
        glob = f.get_tensor("global").float() if need_global else None
    if roi.ndim != 2 or roi.shape[0] != len(ids):
        raise TrainError(f"{path}: 'roi' has shape {tuple(roi.shape)} but metadata lists {len(ids)} ids")
    row = {i: n for n, i in enumerate(ids)}
    missing = [r["id"] for r in records if r["id"] not in row]
    if missing:
        raise TrainError(f"{path}: {len(missing)} training samples have no ROI feature: {missing[:20]}"
                         + (" ..." if len(missing) > 20 else "")
                         + " (re-run extract_roi.py, or --lambda-vis 0)")
    rows = torch.tensor([row[r["id"]] for r in records])
    roi, glob = roi[rows], (glob[rows] if glob is not None else None)
    bad = [records[i]["id"] for i in range(len(records)) if not torch.isfinite(roi[i]).all()]
    if bad:
        raise TrainError(f"{path}: non-finite ROI features for {bad[:20]}")
    return roi, glob, meta


# ----------------------------------------------------------------------------------------------------
# Closed-ended prompts (§B.4): evaluate.py asks every item that has choices with its options in the prompt
# (model.ask), so training shows them too, on a share --options-rate of the items each epoch.
# ----------------------------------------------------------------------------------------------------
def options_shown(record, phase, epoch, seed, rate):
    """Is this item asked with its options in this epoch of this phase? A hash of (seed, phase, id, epoch),
    not an RNG stream: the same on every rank, on a rerun and after a resume, whatever the batch order."""
    if not record.get("choices") or rate <= 0:
        return False
    key = f"options:{seed}:{phase}:{record['id']}:{epoch}"
    u = int(hashlib.sha256(key.encode()).hexdigest()[:13], 16) / 16 ** 13
    return u < rate  # u in [0, 1): rate 1 shows them always


def asked(record, shown):
    """-> (prompt text, answer target). With the options shown the target is the chosen option's text,
    choices[answer_index]: what evaluate.py scores as an exact match (the geometry teacher's `answer` is that
    text; an LLM teacher's answer may be worded differently)."""
    if shown:
        return ask(record["question"], record["choices"]), record["choices"][record["answer_index"]]
    return ask(record["question"]), record["answer"]


def option_tokens(records, tokenizer):
    """Tokens the options add to each record's prompt when they are shown (0 without choices)."""
    return [len(tokenizer(ask(r["question"], r["choices"]))["input_ids"])
            - len(tokenizer(r["question"])["input_ids"]) if r.get("choices") else 0 for r in records]


LENGTH_RATIO = 1.25  # (chosen) the visual-token counts of one length group differ by less than this factor


def length_group(tokens):
    """Group of a prefix with `tokens` visual tokens: geometric bins, so that the longest prefix of a batch
    is < 1.25x its shortest's image part and no large image pads a batch of small ones (activation memory
    grows linearly with the padded prefix length)."""
    return int(math.log(max(tokens, 1)) / math.log(LENGTH_RATIO))


def image_tokens(records, processor):
    """Visual tokens of each record's image after the processor's resize (pixel cap included): the part of
    the prefix length that varies from sample to sample (the question adds a few dozen tokens). Reads only
    the image headers."""
    ip = processor.image_processor
    out = []
    for r in records:
        try:
            with Image.open(r["image_path"]) as im:
                w, h = im.size
        except Exception as e:  # not an image, unknown format, decompression bomb
            raise TrainError(f"samples.jsonl line {r.get('line')}: image '{r['image_path']}' cannot be read "
                             f"({type(e).__name__}: {e})") from None
        out.append(ip.get_number_of_image_patches(h, w, {}) // ip.merge_size ** 2)
    return out


class KBucketSampler:
    """Micro-batches of samples with the same K (select_phase's K, see CURRICULA) and the same length group
    (see length_group; `lengths` None: K only), identical on every rank.
    Per epoch: shuffle each bucket with seed + epoch, cut into batches, shuffle the batch order, pad the
    list to a multiple of world x accum by repeating its head (every rank gets as many batches: no DDP hang),
    then rank r takes batches r, r + world, ... so the micro-batches of one optimizer step are the same
    whatever the split between ranks and accumulation (that is what makes 2 ranks == 1 rank x 2 accum).
    With one length group per K (images of one size, as in the demo) the batches are exactly K-only ones.
    `lengths` may be a function epoch -> lengths, when the prompt shown changes with the epoch
    (--options-rate); every one of the phase's `epochs` is then padded to the count of its longest one, so
    that an epoch is always the same number of steps."""

    def __init__(self, ks, batch_size, world=1, rank=0, accum=1, seed=0, lengths=None, epochs=1):
        self.ks, self.B, self.world, self.rank, self.accum, self.seed = (list(ks), batch_size, world, rank,
                                                                         accum, seed)
        self.lengths = lengths if callable(lengths) else (lambda epoch: lengths)
        self.epoch, self.start = 0, 0
        self.n_groups = len(set(self.keys(0)))
        n = max(sum(math.ceil(keys.count(key) / batch_size) for key in set(keys))
                for keys in map(self.keys, range(max(1, epochs))))
        self.n_global = math.ceil(n / (world * accum)) * world * accum  # padded number of micro-batches

    def keys(self, epoch):
        """Each sample's bucket in this epoch: (K, length group)."""
        lengths = self.lengths(epoch)
        return list(zip(self.ks, [0] * len(self.ks) if lengths is None else map(length_group, lengths)))

    def set_epoch(self, epoch, start=0):
        """Select the epoch's order; `start` skips this rank's first micro-batches (resume mid-epoch)."""
        self.epoch, self.start = epoch, start

    def global_batches(self):
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        keys, batches = self.keys(self.epoch), []
        for key in sorted(set(keys)):
            idx = torch.tensor([i for i, kk in enumerate(keys) if kk == key])
            idx = idx[torch.randperm(len(idx), generator=g)].tolist()
            batches += [idx[j:j + self.B] for j in range(0, len(idx), self.B)]
        if len(batches) > self.n_global:  # an epoch past the `epochs` counted in __init__
            raise ValueError(f"epoch {self.epoch}: {len(batches)} micro-batches, more than the "
                             f"{self.n_global} of every epoch (KBucketSampler epochs=)")
        batches = [batches[j] for j in torch.randperm(len(batches), generator=g).tolist()]
        return [batches[j % len(batches)] for j in range(self.n_global)]

    def __len__(self):  # micro-batches per epoch on this rank
        return self.n_global // self.world

    def __iter__(self):
        return iter(self.global_batches()[self.rank::self.world][self.start:])


def collate(records, idx, processor, dec_tokenizer, roi, glob, shown=None):
    """One K-bucket micro-batch -> (batch for VITAL.forward, K, backbone tokens processed). shown[j]: sample
    idx[j] is asked with its options (options_shown; None: none is)."""
    recs = [records[i] for i in idx]
    K = recs[0]["K"]
    prompts, answers = zip(*[asked(r, s) for r, s in zip(recs, shown or [False] * len(recs))])
    batch = make_batch(processor, dec_tokenizer, [load_image(r["image_path"]) for r in recs],
                       list(prompts), list(answers),
                       [r["reasoning_chain"][:K] for r in recs], K,
                       roi[idx] if roi is not None else None, glob[idx] if glob is not None else None)
    tokens = int(batch["prefix"]["attention_mask"].sum() + batch["answer_mask"].sum()) + K * len(idx)
    return batch, K, tokens


# ----------------------------------------------------------------------------------------------------
# Identity of the models, so that a warm start from another backbone, decoder or LoRA shape is refused.
# ----------------------------------------------------------------------------------------------------
def check_compatible(init, cfg, arch):
    """Refuse a warm start whose backbone, decoder or LoRA shape differs from this run's."""
    old = cfg.get("arch", {})
    for key, what in (("backbone", "backbone"), ("decoder", "decoder"), ("lora", "LoRA shape (r, alpha)")):
        if key == "decoder" and (old.get(key) is None or arch[key] is None):
            continue  # one side trains without the decoder scaffold: nothing to compare
        if old.get(key) != arch[key]:
            raise TrainError(f"--init {init} was trained with {what} {old.get(key)}, "
                             f"this run uses {arch[key]}: "
                             "refusing to warm-start across models")


# ----------------------------------------------------------------------------------------------------
# Optimiser: AdamW (0.9, 0.999), decay 0.01 on matrices only, 5% linear warmup then cosine (§B.3).
# ----------------------------------------------------------------------------------------------------
def param_groups(model, args):
    """-> (groups for AdamW, names per group). Biases and norm gains (ndim < 2) get no weight decay."""
    groups, names = [], []
    for is_dec in (False, True):
        for decay in (True, False):
            sel = [(n, p) for n, p in model.named_parameters()
                   if p.requires_grad and n.startswith("decoder.") == is_dec and (p.ndim >= 2) == decay]
            if sel:
                lr = args.lr_decoder if (is_dec and args.lr_decoder) else args.lr
                groups.append(dict(params=[p for _, p in sel],
                                   weight_decay=args.weight_decay if decay else 0.0, lr=lr, base_lr=lr))
                names.append([n for n, _ in sel])
    return groups, names


def lr_factor(step, total, warmup):
    """Multiplier of the peak lr at optimizer step `step` (0-based): linear warmup, then cosine to 0."""
    w = max(1, round(warmup * total))
    if step < w:
        return (step + 1) / w
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - w) / max(1, total - w))))


# ----------------------------------------------------------------------------------------------------
# Trainer state (resume): tensors in safetensors (optimizer moments, RNG of every rank as uint8), scalars
# in JSON. No pickle: torch.save is never used. Only torch's RNG is consumed (dropout); the data order is a
# function of (seed, epoch), the lr of the step: so step + moments + RNG make the resumed run exact.
# ----------------------------------------------------------------------------------------------------
def gather_rng(device, world):
    """RNG state of every rank, collected on all ranks (uint8 tensors; all_gather, not pickled objects)."""
    states = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        states["cuda"] = torch.cuda.get_rng_state(device)
    out = {}
    for name, s in states.items():
        if world > 1:
            parts = [torch.empty_like(s, device=device) for _ in range(world)]
            dist.all_gather(parts, s.to(device))
            out.update({f"rng.{name}.rank{r}": t.cpu() for r, t in enumerate(parts)})
        else:
            out[f"rng.{name}.rank0"] = s
    return out


def trainer_writer(opt, names, rng, scalars, finished):
    """A writer(path) for save_checkpoint's extra_files: path/state.safetensors + path/state.json.
    A finished phase keeps only the JSON: its Adam moments (2x the decoder's 1.7B in fp32)
    are never reused."""
    def write(path):
        os.makedirs(path)
        if finished:
            with open(os.path.join(path, "state.json"), "w") as f:
                json.dump(dict(scalars, finished=True), f, indent=2, allow_nan=False)
            return
        tensors, groups = dict(rng), []
        sd = opt.state_dict()
        for g, gnames in zip(sd["param_groups"], names):
            for idx, n in zip(g["params"], gnames):
                for field, v in sd["state"].get(idx, {}).items():
                    tensors[f"optim.{n}.{field}"] = v.detach().contiguous().cpu()
            groups.append({k: v for k, v in g.items() if k != "params"} | {"names": gnames})
        save_file(tensors, os.path.join(path, "state.safetensors"))
        with open(os.path.join(path, "state.json"), "w") as f:
            json.dump(dict(scalars, finished=False, param_groups=groups), f, indent=2, allow_nan=False)
    return write


def load_trainer(folder, opt, names, rank, device):
    """Restore optimizer state and this rank's RNG from folder/trainer; returns the JSON scalars."""
    path = os.path.join(folder, "trainer")
    if not os.path.isfile(os.path.join(path, "state.json")):
        raise TrainError(f"{folder} has no trainer/ state: it cannot be resumed")
    with open(os.path.join(path, "state.json")) as f:
        state = json.load(f)
    tensors = load_file(os.path.join(path, "state.safetensors"))
    sd = opt.state_dict()
    if [g["names"] for g in state["param_groups"]] != names:
        raise TrainError(f"{path}: the optimizer's parameters differ from this run's (other flags?)")
    per_param = {}  # "optim.<param name>.<field>" -> {name: {field: tensor}}
    for k, v in tensors.items():
        if k.startswith("optim."):
            n, field = k[len("optim."):].rsplit(".", 1)
            per_param.setdefault(n, {})[field] = v
    for g, saved in zip(sd["param_groups"], state["param_groups"]):
        g.update({k: v for k, v in saved.items() if k != "names"})
        sd["state"].update({idx: per_param[n] for idx, n in zip(g["params"], saved["names"])
                            if n in per_param})
    opt.load_state_dict(sd)
    torch.set_rng_state(tensors[f"rng.cpu.rank{rank}"])
    if device.type == "cuda":
        torch.cuda.set_rng_state(tensors[f"rng.cuda.rank{rank}"], device)
    return state


# ----------------------------------------------------------------------------------------------------
# The run: main() sets up the process (DDP from torchrun's environment), train_phase() is the stage in
# named steps (data, model, warm start or resume, optimizer and data order), train_loop() the loop itself.
# ----------------------------------------------------------------------------------------------------
@dataclass
class Env:
    """Where and how this process trains."""
    rank: int
    world: int
    device: torch.device
    bf16: bool
    ctx: object  # the one precision context: autocast bf16, or nullcontext for fp32
    log: object  # print on rank 0, silent elsewhere

    @property
    def master(self):
        return self.rank == 0


def setup(args):
    """-> (Env, whether DDP was initialised). DDP is detected from torchrun's environment (RANK); a plain
    `python train.py` is world size 1."""
    ddp = int(os.environ.get("RANK", -1)) != -1
    use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    if ddp:
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
        rank, local_rank, world = dist.get_rank(), int(os.environ["LOCAL_RANK"]), dist.get_world_size()
    else:
        rank, local_rank, world = 0, 0, 1
    device = torch.device(f"cuda:{local_rank}" if use_cuda else "cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    bf16 = args.dtype == "bf16" or (args.dtype == "auto" and use_cuda)
    # autocast bf16: frozen weights in bf16, trainable weights, optimizer and losses stay fp32
    ctx = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()
    return Env(rank, world, device, bf16, ctx, print if rank == 0 else (lambda *a, **k: None)), ddp


def main(argv=None, build=None, extra_files=None):
    """train.py's entry; demo/pretrain.py calls it with its own model builder and extra checkpoint files."""
    args = get_args(argv) if not isinstance(argv, argparse.Namespace) else argv
    if getattr(args, "plan", False):
        from bench.memory import print_plan  # the memory model lives with its check against measurements
        return print_plan(args, CURRICULA[args.curriculum])
    env, ddp = setup(args)
    try:
        return train_phase(args, env, build or build_vital, extra_files)
    finally:
        if ddp:
            dist.destroy_process_group()


def load_data(args):
    """-> (this phase's records, roi, glob, roi metadata); roi/glob are None when L_vis is off."""
    samples_path = os.path.join(args.data, "samples.jsonl")
    records = select_phase(read_samples(samples_path), args, samples_path)
    if not (args.lambda_vis > 0 and args.max_k != 0):  # K = 0 everywhere: no step to supervise
        return records, None, None, {}
    roi_path = os.path.join(args.data, "roi.safetensors")
    roi, glob, meta = read_roi(roi_path, records, args.visual_target == "per_step")
    return records, roi, glob, meta


def find_resume(args, phase_dir):
    """The checkpoint --resume continues (None without --resume); never overwrite a phase silently."""
    if not args.resume:
        if any(os.path.exists(d) for d in (phase_dir, phase_dir + ".old")):
            raise TrainError(f"{phase_dir} already holds a checkpoint: add --resume to continue it, "
                             "or remove it (or pick another --out) to train this phase again")
        return None
    found = [d for d in (phase_dir, phase_dir + ".old") if os.path.isfile(os.path.join(d, "config.json"))]
    if not found:
        raise TrainError(f"--resume: no checkpoint in {phase_dir} to continue from")
    return found[0]


def build_vital(args, env, resume_dir, d_v):
    """The frozen backbone (bf16 under autocast) + LoRA, the fp32 decoder (fully trained, §4.1) and heads.
    -> (vital, processor, dec_tokenizer, arch: the identity a warm start must match)."""
    wdtype = torch.bfloat16 if env.bf16 else torch.float32
    backbone, processor = load_backbone(args.backbone, dtype=wdtype, device=env.device,
                                        max_pixels=args.max_pixels)
    add_lora(backbone, args.lora_r, args.lora_alpha, args.lora_dropout)
    with_decoder = args.lambda_sem > 0 and args.max_k != 0
    decoder, dec_tokenizer = (load_decoder(args.decoder, torch.float32, env.device) if with_decoder
                              else (None, None))
    vital = VITAL(backbone, decoder, d_v, args.projector, args.lambda_sem, args.lambda_vis, args.vp_dropout)
    arch = dict(backbone=fingerprint(args.backbone), lora=[args.lora_r, args.lora_alpha],
                decoder=fingerprint(args.decoder) if decoder is not None else None)
    return vital.to(env.device), processor, dec_tokenizer, arch


def warm_start(args, vital, arch, resume_dir, log):
    """Load phase p-1 (or --init) into a new phase, or this phase's own last checkpoint on --resume.
    -> (the source's config or None, the warm-start folder or None)."""
    init = args.init if args.init else (os.path.join(args.out, f"phase{args.phase - 1}") if args.phase > 1
                                        else None)
    init = None if init == "none" else init
    src = resume_dir or init
    if not src:
        return None, None
    cfg_path = os.path.join(src, "config.json")
    if not os.path.isfile(cfg_path):
        hint = f"run --phase {args.phase - 1} first or pass --init" if args.init is None else "check --init"
        raise TrainError(f"phase {args.phase} warm-starts from {src}, which holds no checkpoint ({hint})")
    with open(cfg_path) as f:
        src_cfg = json.load(f)
    check_compatible(src, src_cfg, arch)
    if resume_dir:  # an exact continuation needs the same training flags (stop/save points may change)
        free = {"resume", "max_steps", "save_every", "device", "preset", "models", "backbone", "decoder",
                "data", "out", "grad_ckpt", "plan", "plan_world", "plan_gib"}  # these change no result
        # a flag the checkpoint's train.py did not have yet is not compared (it ran that flag's old behaviour)
        diff = sorted(k for k, v in vars(args).items()
                      if k not in free and k in src_cfg["args"] and src_cfg["args"][k] != v)
        if diff:
            raise TrainError(f"--resume: {resume_dir} was trained with other flags: " + ", ".join(
                f"--{k.replace('_', '-')} {src_cfg['args'].get(k)} (now {getattr(args, k)})" for k in diff))
    try:
        load_checkpoint(src, vital, scaffolds=vital.decoder is not None or vital.vp is not None)
    except (ValueError, FileNotFoundError) as e:
        raise TrainError(f"cannot load {src}: {e}") from None
    log(f"{'resuming from' if resume_dir else 'warm start from'} {src}")
    if not resume_dir and not src_cfg.get("finished"):
        log(f"note: {src} stopped at step {src_cfg.get('step')} of {src_cfg.get('total_steps')} "
            "(not finished)")
    return src_cfg, init


def wrap_ddp(vital, env):
    """DDP over the trainable tensors only: frozen backbone weights and buffers are neither broadcast nor
    all-reduced. Every trainable tensor gets a gradient each step (scaffolds are not built for K = 0), so
    find_unused_parameters stays off."""
    if env.world == 1:
        return vital
    frozen = ([n for n, p in vital.named_parameters() if not p.requires_grad]
              + [n for n, _ in vital.named_buffers()])
    DDP._set_params_and_buffers_to_ignore_for_model(vital, frozen)
    # gradient_as_bucket_view: the gradients ARE views into DDP's all-reduce buckets, not a second copy of
    # every trainable gradient (7.2 GiB at real size: 1.93B fp32)
    return DDP(vital, device_ids=[env.device.index] if env.device.type == "cuda" else None,
               gradient_as_bucket_view=True)


def reset_log(log_path, phase, step):
    """Drop the log lines of this phase that the checkpoint we start from does not contain (a kill can
    also leave a torn last line: dropped)."""
    os.makedirs(os.path.dirname(log_path) or ".", exist_ok=True)
    with open(log_path, "a+") as f:
        f.seek(0)
        keep = [l for l in f
                if l.endswith("\n") and ((e := json.loads(l))["phase"] != phase or e["step"] <= step)]
    with open(log_path, "w") as f:
        f.writelines(keep)


def train_phase(args, env, build=build_vital, extra_files=None):
    """One curriculum phase. `build` makes the model (demo/pretrain.py passes its own); `extra_files(raw,
    processor)` adds folders to every checkpoint (the pretrained backbone). -> the phase folder."""
    phase_dir, log = os.path.join(args.out, f"phase{args.phase}"), env.log
    if getattr(args, "embedded", False):
        log(f"no --data: the embedded default: data {args.data}, tiny models {args.models}, backbone "
            f"{args.backbone}, LoRA r {args.lora_r}, lr {args.lr:g}, {args.epochs:g} epochs -> {args.out} "
            "(a real run names --data, --backbone and --decoder)")
        make_embedded_default(args, env)
    records, roi, glob, roi_meta = load_data(args)
    resume_dir = find_resume(args, phase_dir)
    if args.preset == "tiny" and not os.path.isfile(os.path.join(args.backbone, "config.json")):
        if env.master:
            make_tiny(args.models)
        if env.world > 1:
            dist.barrier()
    torch.manual_seed(args.seed)  # same init on every rank (DDP also broadcasts rank 0's)
    raw, processor, dec_tokenizer, arch = build(args, env, resume_dir,
                                                roi.shape[1] if roi is not None else None)
    src_cfg, init = warm_start(args, raw, arch, resume_dir, log)
    if args.grad_ckpt:  # the same gradients (tests/test_ckpt.py), a fraction of the saved activations
        set_checkpointing(raw, True)
    raw.train()
    model = wrap_ddp(raw, env)  # raw is what we save: keys without "module."
    groups, names = param_groups(raw, args)
    opt = torch.optim.AdamW(groups, betas=(0.9, 0.999), eps=1e-8, fused=env.device.type == "cuda")

    # ---- data order and the length of the phase
    # a bucket's length: the image tokens, plus the options' tokens in an epoch that shows them (the bare
    # question, a few dozen tokens, is left out as before)
    shown = (lambda i, epoch: options_shown(records[i], args.phase, epoch, args.seed, args.options_rate))
    vis, opt_len = image_tokens(records, processor), option_tokens(records, processor.tokenizer)
    lengths = (lambda epoch: [vis[i] + opt_len[i] * shown(i, epoch) for i in range(len(records))])
    sampler = KBucketSampler([r["K"] for r in records], args.batch_size, env.world, env.rank, args.grad_accum,
                             args.seed, lengths=lengths, epochs=math.ceil(args.epochs))
    steps_per_epoch = len(sampler) // args.grad_accum
    total = max(1, round(args.epochs * steps_per_epoch))
    global_batch = args.batch_size * args.grad_accum * env.world
    n_train = sum(p.numel() for p in raw.parameters() if p.requires_grad)
    ks = {k: sum(r["K"] == k for r in records) for k in sorted({r["K"] for r in records})}
    log(f"phase {args.phase} ({args.curriculum}, --depth {args.depth}): {len(records)} train samples, "
        f"samples per K {ks}, {n_train / 1e6:.2f}M trainable parameters, "
        f"{'bf16 autocast' if env.bf16 else 'fp32'} on {env.device}"
        f"{', activation checkpointing' if args.grad_ckpt else ''}; {sampler.n_groups} (K, length) groups")
    log(f"global batch = {args.batch_size} per device x {args.grad_accum} accum x {env.world} ranks = "
        f"{global_batch}; {steps_per_epoch} steps/epoch x {args.epochs} epochs = {total} steps")

    step = 0
    if resume_dir:
        if src_cfg.get("finished"):
            log(f"{resume_dir} already finished its {src_cfg['total_steps']} steps: nothing to do")
            return phase_dir
        if ((src_cfg["world_size"], src_cfg["global_batch"], src_cfg["total_steps"])
                != (env.world, global_batch, total)):
            raise TrainError(f"{resume_dir} was trained with world size {src_cfg['world_size']}, "
                             f"global batch {src_cfg['global_batch']}, {src_cfg['total_steps']} steps; "
                             f"this run has {env.world}, {global_batch}, {total}: "
                             "exact resume needs the same")
        step = load_trainer(resume_dir, opt, names, env.rank, env.device)["step"]
    else:
        torch.manual_seed(args.seed + env.rank)  # per-rank dropout streams (a resume restores them instead)

    samples_path, roi_path = (os.path.join(args.data, "samples.jsonl"),
                              os.path.join(args.data, "roi.safetensors"))
    config = dict(args=vars(args), phase=args.phase, arch=arch, world_size=env.world,
                  global_batch=global_batch, total_steps=total,
                  backbone_path=os.path.abspath(args.backbone), init=init,
                  decoder_path=os.path.abspath(args.decoder) if raw.decoder is not None else None,
                  encoder_path=roi_meta.get("encoder_path"), encoder_kind=roi_meta.get("encoder_kind"),
                  encoder_image_size=int(roi_meta["image_size"]) if "image_size" in roi_meta else None,
                  d_v=roi.shape[1] if roi is not None else None,
                  data=dict(samples_sha256=file_sha256(samples_path), n_train=len(records),
                            roi_sha256=file_sha256(roi_path) if roi is not None else None))
    log_path = os.path.join(args.out, "log.jsonl")
    if env.master:
        reset_log(log_path, args.phase, step)

    def save(step):
        rng = gather_rng(env.device, env.world)  # collective: every rank takes part
        if env.master:
            scalars = dict(step=step, world_size=env.world, global_batch=global_batch, total_steps=total)
            extra = {"trainer": trainer_writer(opt, names, rng, scalars, step >= total)}
            extra.update(extra_files(raw, processor) if extra_files else {})
            save_checkpoint(phase_dir, raw, dict(config, step=step, finished=step >= total),
                            extra_files=extra)

    # the sampler's epoch decides which items see their options (and so which bucket they are in)
    batches = (lambda idx: collate(records, idx, processor, dec_tokenizer, roi, glob,
                                   [shown(i, sampler.epoch) for i in idx]))
    step = train_loop(args, env, model, opt, sampler, batches, step, total, steps_per_epoch, save, log_path,
                      resumed=resume_dir is not None)
    log(f"phase {args.phase}: step {step}/{total}, checkpoint in {phase_dir}")
    return phase_dir


def train_loop(args, env, model, opt, sampler, batches, step, total, steps_per_epoch, save, log_path,
               resumed):
    """Optimizer steps from `step` to the phase's end (or --max-steps): grad accumulation, one all-reduce
    per step, grad clipping, the lr schedule, a log line per step, a checkpoint every --save-every, and
    <out>/loss.png redrawn from log.jsonl at the end."""
    stop = min(total, args.max_steps) if args.max_steps > 0 else total
    params = [p for p in model.parameters() if p.requires_grad]
    device, last_saved = env.device, (step if resumed else None)
    bar = tqdm(total=stop, initial=step, desc=f"phase {args.phase}", disable=not env.master,
               dynamic_ncols=True)
    while step < stop:
        epoch, pos = divmod(step, steps_per_epoch)
        sampler.set_epoch(epoch, start=pos * args.grad_accum)
        it = iter(sampler)
        for _ in range(pos, steps_per_epoch):
            if step >= stop:
                break
            t0 = time.time()
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            # stats: L_task, L_sem, L_vis, loss (means over micro-batches), samples, tokens
            stats = torch.zeros(6, device=device, dtype=torch.float64)
            for micro in range(args.grad_accum):
                batch, K, tokens = batches(next(it))
                batch = batch_to(batch, device)
                # Gradients are all-reduced only on the last micro-step of the optimizer step.
                last = env.world == 1 or micro == args.grad_accum - 1
                with nullcontext() if last else model.no_sync():
                    with env.ctx:
                        # --depth phase: L_vis on every step, also past the item's chain (eq. 6's target
                        # is shared by all steps and needs no sentence)
                        out = model(batch, K, args.visual_target == "per_step",
                                    vis_all_steps=args.depth == "phase")
                    (out["loss"] / args.grad_accum).backward()
                terms = torch.stack([out[k].detach().double() for k in ("L_task", "L_sem", "L_vis", "loss")])
                stats[:4] += terms / args.grad_accum
                stats[4] += len(batch["answer_ids"])
                stats[5] += tokens
            if env.world > 1:  # every rank's losses, not rank 0's last micro-batch
                dist.all_reduce(stats)
                stats[:4] /= env.world
            gnorm = torch.nn.utils.clip_grad_norm_(params,
                                                   args.grad_clip if args.grad_clip > 0 else float("inf"))
            if not (torch.isfinite(stats[:4]).all() and torch.isfinite(gnorm)):
                kept = f"last good checkpoint: {args.out}/phase{args.phase} (step {last_saved})" \
                    if last_saved is not None else \
                    "no checkpoint of this phase was written yet"
                raise TrainError(f"non-finite loss or gradient at phase {args.phase} step {step + 1} (L_task "
                                 f"{stats[0].item():.4g}, L_sem {stats[1].item():.4g}, "
                                 f"L_vis {stats[2].item():.4g}, "
                                 f"grad norm {gnorm.item():.4g}); stopped without saving; {kept}")
            lr_mult = lr_factor(step, total, args.warmup)
            for g in opt.param_groups:
                g["lr"] = g["base_lr"] * lr_mult
            opt.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            if device.type == "cuda":
                torch.cuda.synchronize(device)  # time the GPU's work, not the launch queue
            if env.master:
                write_log_line(log_path, args.phase, step, epoch, stats, opt, gnorm, time.time() - t0, device,
                               bar)
            if step % args.save_every == 0 or step == stop:
                save(step)
                last_saved = step
    bar.close()
    if env.master:
        plot_losses(log_path, os.path.join(args.out, "loss.png"))
    return step


def write_log_line(log_path, phase, step, epoch, stats, opt, gnorm, dt, device, bar):
    """One log.jsonl line per optimizer step: losses, lr, grad norm, speed, peak memory."""
    peak = (torch.cuda.max_memory_allocated(device) if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 2 ** 20
    entry = dict(step=step, phase=phase, epoch=epoch, L_task=stats[0].item(), L_sem=stats[1].item(),
                 L_vis=stats[2].item(), loss=stats[3].item(), lr=opt.param_groups[0]["lr"],
                 grad_norm=gnorm.item(), samples_per_s=stats[4].item() / dt,
                 tokens_per_s=stats[5].item() / dt, peak_mem_mib=round(peak, 1))
    with open(log_path, "a") as f:
        f.write(json.dumps(entry, allow_nan=False) + "\n")
    bar.update(1)
    bar.set_postfix(L_task=f"{entry['L_task']:.3f}", L_sem=f"{entry['L_sem']:.3f}",
                    L_vis=f"{entry['L_vis']:.3f}", lr=f"{entry['lr']:.2e}")


LOSS_COLORS = {"L_task": (31, 119, 180), "L_sem": (44, 160, 44), "L_vis": (214, 39, 40), "loss": (0, 0, 0)}


def plot_losses(log_path, png_path, W=800, H=400, smooth=20):
    """<out>/loss.png from log.jsonl, PIL only (no plotting library to install): L_task, L_sem, L_vis and
    the total of eq. (7) against the optimizer step over all phases in the log (file order); raw values
    faint, a centred mean over ~`smooth` steps (within each phase) bold, grey lines at phase starts.
    The y axis is log10 because L_vis (an L1 per feature of unit vectors) sits far below L_task; a term
    that is 0 (its scaffold off, or K = 0) has no place on it and is not drawn."""
    with open(log_path) as f:
        log = [json.loads(l) for l in f if l.endswith("\n")]  # a torn last line is skipped
    vals = [e[k] for e in log for k in LOSS_COLORS if e[k] > 0]
    if not vals:
        return
    n, (L, R, T, B) = len(log), (60, 12, 22, 26)  # margins hold the tick labels and the legend
    lo, hi = math.floor(math.log10(min(vals))), math.ceil(math.log10(max(vals)))
    hi = max(hi, lo + 1)
    x = lambda s: L + (W - L - R) * s / n                                  # optimizer step s in 0..n
    y = lambda v: T + (H - T - B) * (hi - math.log10(v)) / (hi - lo)
    im = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(im)
    for p in range(lo, hi + 1):                                            # a tick and grid line per decade
        d.line([(L, y(10 ** p)), (W - R, y(10 ** p))], fill=(235, 235, 235))
        d.text((4, y(10 ** p) - 6), f"{10 ** p:g}", fill="black")
    mag = 10 ** math.floor(math.log10(max(1, n / 5)))
    every = next(m * mag for m in (1, 2, 5, 10) if n / (m * mag) <= 6)   # at most 6 round step ticks
    for s in range(0, n + 1, every):
        d.line([(x(s), H - B), (x(s), H - B + 4)], fill="black")
        d.text((x(s) - 8, H - B + 6), str(s), fill="black")
    start = []                                                             # first line of each line's phase
    for i, e in enumerate(log):
        if i == 0 or e["phase"] != log[i - 1]["phase"]:
            start.append(i)
            d.line([(x(i), T), (x(i), H - B)], fill=(150, 150, 150))
            d.text((x(i) + 3, T + 2), f"phase {e['phase']}", fill=(110, 110, 110))
        else:
            start.append(start[-1])
    for j, (k, c) in enumerate(LOSS_COLORS.items()):
        v = [e[k] for e in log]
        win = [[v[j] for j in range(max(0, i - smooth // 2), min(n, i + smooth // 2 + 1))
                if start[j] == start[i]] for i in range(n)]               # centred, within the phase
        d.line([(x(i + 1), y(v[i])) for i in range(n) if v[i] > 0],
               fill=tuple(ch + (255 - ch) * 3 // 4 for ch in c))          # a quarter of the colour: faint
        d.line([(x(i + 1), y(sum(w) / len(w))) for i, w in enumerate(win) if min(w) > 0], fill=c, width=2)
        d.text((L + 8 + 70 * j, 5), "total" if k == "loss" else k, fill=c)
    d.rectangle([L, T, W - R, H - B], outline="black")
    d.text((W - R - 170, 5), "x: optimizer step, y: log10", fill="black")
    im.save(png_path)

if __name__ == "__main__":
    try:
        main()
    except TrainError as e:
        sys.exit(f"train.py: error: {e}")
