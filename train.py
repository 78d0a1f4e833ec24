"""
VITAL stage 3: curriculum training of the LoRA + scaffolds (paper §3.5, §4.1, §B.3,
ablations §4.3, §C.1-C.5).

Reads  DATA/samples.jsonl (train split only) + DATA/roi.safetensors (the L_vis targets, extract_roi.py).
Writes runs/<name>/phase<p>/  adapter.safetensors, scaffold.safetensors, config.json, trainer/ (for --resume)
       runs/<name>/log.jsonl   one line per optimizer step (step, phase, losses, lr, grad norm, speed, memory)
       runs/<name>/loss.png    the losses of every phase in the log, redrawn after each phase (pipeline/run_log.py)

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
No --data: the embedded default (embedded/default.py), the demo's phantom data, tiny models and pretrained tiny
backbone under runs/demo ($VITAL_DEMO_DIR moves it), made by the demo's own commands if absent.
Memory per GPU at real size for a command's flags (README "Real scale"; pipeline/memory_plan.py; nothing is loaded):
    python train.py --plan --phase 3            # the defaults: batch 8, images <= 448 x 448 px (--max-pixels,
                                                # pipeline.io.MAX_PIXELS says why)
    python train.py --plan --phase 3 --grad-ckpt --batch-size 32   # cache-safe activation checkpointing
Phase p > 1 from scratch or from another run: --init none | --init runs/other/phase1. demo/pretrain.py (the
tiny backbone's stand-in pretraining) reuses train_phase below with its own model builder.
Ablations: --curriculum {3-phase,2-phase,full-mix,reverse}  --lambda-sem 0  --lambda-vis 0  --projector linear
           --visual-target per_step  --max-k 0 (direct-answer baseline) ... --max-k 4  --feedback pause.
Option: --readout cache writes h_K into the cache before the answer (model.latent_loop; default head, eq. 2).
The walk (prepare_data.py --walk-hops N): --visual-target hop, step k regresses the lesion move k lands on.
Depth parity: --depth phase (default) runs every item of a phase at the phase's largest K (its cap, or its
longest chain for 'all K'; under --max-k), as inference runs one K for all; steps past an item's chain get L_vis
(eq. 6) but no L_sem (eq. 4: valid steps). --depth own runs each item at its own K (demo/evidence.md compares).
Closed-ended prompts (§B.4): --options-rate P (default 0.5) asks an item that has choices with its options
(pipeline.io.ask, as evaluate.py asks it) in a share P of its epochs (a hash of seed, phase, id and epoch),
its target then the chosen option's text.
"""
import argparse
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
from tqdm import tqdm

from embedded.default import default_paths, make_default
from embedded.tiny import make_tiny
from model import READOUTS, VITAL, add_lora
from pipeline.activation_checkpointing import set_checkpointing
from pipeline.io import (MAX_PIXELS, ask, batch_to, file_sha256, fingerprint, load_backbone, load_checkpoint,
                         load_decoder, load_image, make_batch, save_checkpoint)
from pipeline.memory_plan import print_plan
from pipeline.run_log import lvis_baselines, plot_losses, reset_log, tail_means, write_log_line
from pipeline.trainer_state import gather_rng, load_trainer, trainer_writer
from pipeline.training_data import image_tokens, read_roi, read_samples
from pipeline.training_process import setup, wrap_ddp

# ----------------------------------------------------------------------------------------------------
# Curriculum schedules (§3.5, §4.3 Table 3). Each phase = (highest latent_steps admitted, None = all K;
# default epochs). --depth own: a sample runs at its own K = min(latent_steps, --max-k); --depth phase:
# every sample runs the phase's largest K (the "highest" column, capped by --max-k), see select_phase.
#   schedule  | phase 1          | phase 2          | phase 3
#   3-phase   | K = 1, 5 ep      | K <= 2, 5 ep     | all K, 10 ep     (paper default, §4.1/§B.3)
#   2-phase   | K <= 2, 10 ep    | all K, 10 ep     |                  (chosen: same 20 epochs in total)
#   full-mix  | all K, 20 ep     |                  |                  (chosen: same 20 epochs in total)
#   reverse   | all K, 10 ep     | K <= 2, 5 ep     | K = 1, 5 ep      (chosen: 3-phase played backwards)
#   stepwise  | K = 1, 2 ep; then K <= 2, 3, 4, 5, 2 ep each; phase 6 all K, 10 ep (chosen: one phase per extra
#             | step, as Coconut's stages; a cap at or above the data's largest K admits every item)
# ----------------------------------------------------------------------------------------------------
CURRICULA = {
    "3-phase": [(1, 5), (2, 5), (None, 10)],
    "2-phase": [(2, 10), (None, 10)],
    "full-mix": [(None, 20)],
    "reverse": [(None, 10), (2, 5), (1, 5)],
    "stepwise": [(1, 2), (2, 2), (3, 2), (4, 2), (5, 2), (None, 10)],
}


class TrainError(Exception):
    """A problem with the inputs or the run folder, reported as one clear message (no traceback)."""


# ----------------------------------------------------------------------------------------------------
# The command line: flags in groups (the module docstring tells the longer stories), then the defaults
# that depend on other flags; the embedded default when there is no --data.
# ----------------------------------------------------------------------------------------------------
def get_args(argv=None):
    """train.py's flags, in groups; resolve_args then fills the defaults that depend on other flags."""
    ap = argparse.ArgumentParser(description="VITAL curriculum training (paper §3.5)")
    g = ap.add_argument_group("data")
    g.add_argument("--data", help="folder with samples.jsonl and roi.safetensors (none: the embedded default)")
    g.add_argument("--limit", type=int, default=0, help="use only the first N train samples of the phase (0: all)")
    g.add_argument("--options-rate", type=float, default=0.5, help="share of items asked with their options")
    g = ap.add_argument_group("models")
    g.add_argument("--preset", choices=["tiny"], help="tiny: tiny models of the real classes in --models")
    g.add_argument("--models", default="runs/tiny", help="folder of the tiny preset's models (made if absent)")
    g.add_argument("--backbone", help="Qwen3-VL model folder (e.g. Qwen3-VL-8B-Instruct)")
    g.add_argument("--decoder", help="auxiliary text decoder folder (e.g. Qwen3-1.7B)")
    g.add_argument("--lora-r", type=int, help="LoRA rank (default 64, paper; 8 with --preset tiny)")
    g.add_argument("--lora-alpha", type=float, help="LoRA alpha (default 128; 16 with --preset tiny)")
    g.add_argument("--lora-dropout", type=float, default=0.05, help="dropout on the LoRA input (§B.3)")
    g.add_argument("--projector", default="res_mlp_ln", help="visual projector variant (§C.2, Table 13)",
                   choices=["linear", "mlp", "mlp_ln", "res_mlp_ln", "transformer"])
    g.add_argument("--vp-dropout", type=float, default=0.1, help="dropout inside the visual projector")
    g = ap.add_argument_group("curriculum")
    g.add_argument("--phase", type=int, default=1, help="curriculum phase to train (1-based)")
    g.add_argument("--curriculum", default="3-phase", choices=list(CURRICULA), help="schedule (§4.3, CURRICULA)")
    g.add_argument("--epochs", type=float, help="epochs of this phase (default from the schedule: 5/5/10)")
    g.add_argument("--max-k", type=int, help="cap on latent steps: K = min(latent_steps, max_k); 0: direct answer")
    g.add_argument("--depth", default="phase", choices=["own", "phase"], help="an item's K: the phase's or its own")
    g.add_argument("--init", help="warm-start checkpoint (default runs/<name>/phase<p-1>; 'none': from scratch)")
    g = ap.add_argument_group("losses (eq. 7)")
    g.add_argument("--lambda-sem", type=float, default=1.0, help="weight of L_sem; 0 removes the decoder")
    g.add_argument("--lambda-vis", type=float, default=0.1, help="weight of L_vis; 0 removes the visual projector")
    g.add_argument("--visual-target", default="shared", choices=["shared", "per_step", "hop"],
                   help="L_vis target: shared (the paper's), per_step (global -> ROI, §C.5), hop (the walk: the lesion "
                        "move k lands on, extract_roi.py's roi_steps)")
    g.add_argument("--feedback", default="state", choices=["state", "pause"],
                   help="latent step k's input: h_{k-1} (the method) or a learned constant (the pause arm, "
                        "an ablation: same K and curriculum, no recurrence; --max-k or 8 of them)")
    g.add_argument("--readout", default="head", choices=list(READOUTS),
                   help="how the answer reads h_K: head (eq. 2, the paper's: lm_head(h_K) gives the first token, "
                        "h_K never enters the cache) or cache (h_K also written to the cache as one more position, "
                        "so every answer token can attend to it; model.latent_loop)")
    g = ap.add_argument_group("optimisation")
    g.add_argument("--batch-size", type=int, default=8, help="samples per micro-batch per device")
    g.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step per device")
    g.add_argument("--lr", type=float, default=1e-4, help="peak learning rate (LoRA and scaffolds)")
    g.add_argument("--lr-decoder", type=float, help="peak learning rate of the auxiliary decoder (default --lr)")
    g.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay (not on biases, norms)")
    g.add_argument("--warmup", type=float, default=0.05, help="fraction of the phase's steps with linear warmup")
    g.add_argument("--grad-clip", type=float, default=1.0, help="max global grad norm (0: off)")
    g = ap.add_argument_group("run")
    g.add_argument("--out", default="runs/vital", help="run folder; phase p goes to <out>/phase<p>")
    g.add_argument("--save-every", type=int, default=500, help="checkpoint every N optimizer steps (and at the end)")
    g.add_argument("--resume", action="store_true", help="continue this phase from its last checkpoint")
    g.add_argument("--max-steps", type=int, default=0, help="stop after this step (the lr schedule spans the phase)")
    g.add_argument("--seed", type=int, default=1337, help="seed of init, data order and dropout (rank r: seed+r)")
    g.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="where to train")
    g.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16"], help="autocast (auto: bf16 on CUDA)")
    g = ap.add_argument_group("memory")
    g.add_argument("--max-pixels", type=int, default=MAX_PIXELS, help="cap on an image's pixels (0: the backbone's)")
    g.add_argument("--grad-ckpt", action="store_true", help="activation checkpointing: same gradients, less memory")
    g.add_argument("--plan", action="store_true", help="print this command's per-GPU memory at real size and exit")
    g.add_argument("--plan-world", type=int, default=6, help="--plan: GPUs (DDP ranks; the paper: 6)")
    g.add_argument("--plan-gib", type=float, default=79.6, help="--plan: GiB of one GPU (79.6: an 80 GB H100)")
    return resolve_args(ap, ap.parse_args(argv))


def resolve_args(ap, args):
    """The defaults that depend on other flags (no --data: the embedded default, embedded/default.py; the tiny
    preset's folders, LoRA's shape, the phase's K cap and epochs), and the combinations refused."""
    args.embedded = args.data is None and not args.plan  # --plan reads no data and builds nothing
    if args.embedded:
        if args.backbone or args.decoder or args.preset:
            ap.error("give --data with --backbone/--decoder/--preset (a real run names its folders)")
        args.preset = "tiny"  # the demo's phantom data, tiny models and pretrained tiny backbone
        args.models, args.data, args.backbone = default_paths()
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


def make_embedded_default(args, env):
    """Say what the embedded default trains on; rank 0 makes what is missing with the demo's commands
    (embedded/default.py), the other ranks wait for it."""
    env.log(f"no --data: the embedded default: data {args.data}, tiny models {args.models}, backbone "
            f"{args.backbone}, LoRA r {args.lora_r}, lr {args.lr:g}, {args.epochs:g} epochs -> {args.out} "
            "(a real run names --data, --backbone and --decoder)")
    if env.master and not os.path.isfile(os.path.join(args.data, "roi.safetensors")):
        env.log(f"no --data: making the embedded default (tiny models, phantom data, ROI features) in "
                f"{os.path.dirname(args.data)}")
        make_default(args.models, args.data)
    if env.world > 1:
        dist.barrier()


def make_tiny_models(args, env):
    """--preset tiny: rank 0 writes the tiny models if they are missing, the other ranks wait for it."""
    if args.preset == "tiny" and not os.path.isfile(os.path.join(args.backbone, "config.json")):
        if env.master:
            make_tiny(args.models)
        if env.world > 1:
            dist.barrier()


# ----------------------------------------------------------------------------------------------------
# Data: samples.jsonl (prepare_data.py) + roi.safetensors (extract_roi.py), read and checked by
# pipeline/training_data.py; this phase's items and their K.
# ----------------------------------------------------------------------------------------------------
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
    # skips them: eq. 4 averages the valid steps; L_vis still counts them, see optimizer_step).
    top = hi if hi is not None else max(r["latent_steps"] for r in chosen)
    for r in chosen:
        k = top if args.depth == "phase" else r["latent_steps"]
        r["K"] = k if args.max_k is None else min(k, args.max_k)
    missing = [r["image_path"] for r in chosen if not os.path.isfile(r["image_path"])]
    if missing:
        raise TrainError(f"{len(missing)} images named in {path} do not exist, e.g. {missing[:3]}")
    return chosen


def load_data(args):
    """-> (this phase's records, roi, glob, roi metadata); roi/glob are None when L_vis is off."""
    samples_path = os.path.join(args.data, "samples.jsonl")
    records = select_phase(read_samples(samples_path, TrainError), args, samples_path)
    if not (args.lambda_vis > 0 and args.max_k != 0):  # K = 0 everywhere: no step to supervise
        return records, None, None, {}
    roi_path = os.path.join(args.data, "roi.safetensors")
    roi, glob, meta = read_roi(roi_path, records, args.visual_target, TrainError)
    return records, roi, glob, meta


# ----------------------------------------------------------------------------------------------------
# Closed-ended prompts (§B.4): evaluate.py asks every item that has choices with its options in the prompt
# (pipeline.io.ask), so training shows them too, on a share --options-rate of the items each epoch.
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


# ----------------------------------------------------------------------------------------------------
# Data order: micro-batches of one K and one length group, the same on every rank (KBucketSampler).
# ----------------------------------------------------------------------------------------------------
LENGTH_RATIO = 1.25  # (chosen) the visual-token counts of one length group differ by less than this factor


def length_group(tokens):
    """Group of a prefix with `tokens` visual tokens: geometric bins, so that the longest prefix of a batch
    is < 1.25x its shortest's image part and no large image pads a batch of small ones (activation memory
    grows linearly with the padded prefix length)."""
    return int(math.log(max(tokens, 1)) / math.log(LENGTH_RATIO))


@dataclass
class Split:
    """How the micro-batches of one optimizer step are shared out: `world` ranks, each accumulating `accum`
    of them; this process is rank `rank`."""
    world: int = 1
    rank: int = 0
    accum: int = 1


class KBucketSampler:
    """Micro-batches of samples with the same K (select_phase's K, see CURRICULA) and the same length group
    (see length_group; `lengths` None: K only), identical on every rank.
    Per epoch: shuffle each bucket with seed + epoch, cut into batches, shuffle the batch order, pad the
    list to a multiple of world x accum (`split`) by repeating its head (every rank gets as many batches: no DDP hang),
    then rank r takes batches r, r + world, ... so the micro-batches of one optimizer step are the same
    whatever the split between ranks and accumulation (that is what makes 2 ranks == 1 rank x 2 accum).
    With one length group per K (images of one size, as in the demo) the batches are exactly K-only ones.
    `lengths` may be a function epoch -> lengths, when the prompt shown changes with the epoch
    (--options-rate); every one of the phase's `epochs` is then padded to the count of its longest one, so
    that an epoch is always the same number of steps."""

    def __init__(self, ks, batch_size, split=None, seed=0, lengths=None, epochs=1):
        split = split or Split()
        self.ks, self.B, self.seed = list(ks), batch_size, seed
        self.world, self.rank, self.accum = split.world, split.rank, split.accum
        self.lengths = lengths if callable(lengths) else (lambda epoch: lengths)
        self.epoch, self.start = 0, 0
        self.n_groups = len(set(self.keys(0)))
        n = max(sum(math.ceil(keys.count(key) / batch_size) for key in set(keys))
                for keys in map(self.keys, range(max(1, epochs))))
        self.n_global = math.ceil(n / (self.world * self.accum)) * self.world * self.accum  # padded micro-batches

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


def collate(records, idx, processor, dec_tokenizer, targets=None, shown=None):
    """One K-bucket micro-batch -> (batch for VITAL.forward, K, backbone tokens processed). targets: (roi, glob),
    the L_vis targets in the order of `records` (None: none). shown[j]: sample idx[j] is asked with its options
    (options_shown; None: none is)."""
    roi, glob = targets or (None, None)
    recs = [records[i] for i in idx]
    K = recs[0]["K"]
    prompts, answers = zip(*[asked(r, s) for r, s in zip(recs, shown or [False] * len(recs))])
    batch = make_batch(processor, dec_tokenizer, [load_image(r["image_path"]) for r in recs],
                       list(prompts), list(answers),
                       [r["reasoning_chain"][:K] for r in recs], K,
                       roi[idx] if roi is not None else None, glob[idx] if glob is not None else None)
    tokens = int(batch["prefix"]["attention_mask"].sum() + batch["answer_mask"].sum()) + K * len(idx)
    return batch, K, tokens


def data_order(args, env, records, processor):
    """-> (this rank's KBucketSampler of the phase, shown(i, epoch): is item i asked with its options then).
    A bucket's length: the image tokens, plus the options' tokens in an epoch that shows them (the bare
    question, a few dozen tokens, is left out as before)."""
    shown = (lambda i, epoch: options_shown(records[i], args.phase, epoch, args.seed, args.options_rate))
    vis, opt_len = image_tokens(records, processor, TrainError), option_tokens(records, processor.tokenizer)
    lengths = (lambda epoch: [vis[i] + opt_len[i] * shown(i, epoch) for i in range(len(records))])
    sampler = KBucketSampler([r["K"] for r in records], args.batch_size, Split(env.world, env.rank, args.grad_accum),
                             args.seed, lengths=lengths, epochs=math.ceil(args.epochs))
    return sampler, shown


# ----------------------------------------------------------------------------------------------------
# Warm start and resume: never across models (backbone, decoder, LoRA shape), resume only exactly.
# ----------------------------------------------------------------------------------------------------
def check_compatible(init, cfg, arch):
    """Refuse a warm start whose backbone, decoder, LoRA shape or latent input differs from this run's."""
    base = dict(pause=0, readout="head")  # what a checkpoint from before these keys ran
    old, arch = dict(base, **cfg.get("arch", {})), dict(base, **arch)
    for key, what in (("backbone", "backbone"), ("decoder", "decoder"), ("lora", "LoRA shape (r, alpha)"),
                      ("pause", "pause embeddings (--feedback pause)"), ("readout", "--readout")):
        if key == "decoder" and (old.get(key) is None or arch[key] is None):
            continue  # one side trains without the decoder scaffold: nothing to compare
        if old.get(key) != arch[key]:
            raise TrainError(f"--init {init} was trained with {what} {old.get(key)}, "
                             f"this run uses {arch[key]}: "
                             "refusing to warm-start across models")


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


def check_resumable(resume_dir, src_cfg, env, global_batch, total):
    """An exact resume needs the world size, global batch and number of steps the checkpoint was trained with."""
    if ((src_cfg["world_size"], src_cfg["global_batch"], src_cfg["total_steps"])
            != (env.world, global_batch, total)):
        raise TrainError(f"{resume_dir} was trained with world size {src_cfg['world_size']}, global batch "
                         f"{src_cfg['global_batch']}, {src_cfg['total_steps']} steps; this run has {env.world}, "
                         f"{global_batch}, {total}: exact resume needs the same")


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
# The run: main() sets up the process (pipeline/training_process.py), train_phase() is the stage in named steps
# (data, model, warm start or resume, optimizer and data order), train_loop() the loop itself.
# ----------------------------------------------------------------------------------------------------
def main(argv=None, build=None, extra_files=None):
    """train.py's entry; demo/pretrain.py calls it with its own model builder and extra checkpoint files."""
    args = get_args(argv) if not isinstance(argv, argparse.Namespace) else argv
    if getattr(args, "plan", False):
        return print_plan(args, CURRICULA[args.curriculum])
    env, ddp = setup(args)
    try:
        return train_phase(args, env, build or build_vital, extra_files)
    finally:
        if ddp:
            dist.destroy_process_group()


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
    pause = (args.max_k or 8) if args.feedback == "pause" else 0
    vital = VITAL(backbone, decoder, d_v, args.projector, args.lambda_sem, args.lambda_vis, args.vp_dropout, pause,
                  args.readout)
    arch = dict(backbone=fingerprint(args.backbone), lora=[args.lora_r, args.lora_alpha],
                decoder=fingerprint(args.decoder) if decoder is not None else None, pause=pause, readout=args.readout)
    return vital.to(env.device), processor, dec_tokenizer, arch


def data_config(args, records, roi, meta):
    """config.json's record of the data a phase trained on: the encoder that made the L_vis targets (explain.py
    re-attaches it), their width, and the sha256 of samples.jsonl and roi.safetensors."""
    samples_path, roi_path = (os.path.join(args.data, "samples.jsonl"),
                              os.path.join(args.data, "roi.safetensors"))
    return dict(encoder_path=meta.get("encoder_path"), encoder_kind=meta.get("encoder_kind"),
                encoder_image_size=int(meta["image_size"]) if "image_size" in meta else None,
                d_v=roi.shape[-1] if roi is not None else None,
                data=dict(samples_sha256=file_sha256(samples_path), n_train=len(records),
                          roi_sha256=file_sha256(roi_path) if roi is not None else None))


def log_phase(args, env, records, raw, sampler, total):
    """Two lines on what this phase trains: samples per K, trainable parameters, precision, batch and steps."""
    steps_per_epoch, global_batch = len(sampler) // args.grad_accum, args.batch_size * args.grad_accum * env.world
    n_train = sum(p.numel() for p in raw.parameters() if p.requires_grad)
    ks = {k: sum(r["K"] == k for r in records) for k in sorted({r["K"] for r in records})}
    env.log(f"phase {args.phase} ({args.curriculum}, --depth {args.depth}): {len(records)} train samples, "
            f"samples per K {ks}, {n_train / 1e6:.2f}M trainable parameters, "
            f"{'bf16 autocast' if env.bf16 else 'fp32'} on {env.device}"
            f"{', activation checkpointing' if args.grad_ckpt else ''}; {sampler.n_groups} (K, length) groups")
    env.log(f"global batch = {args.batch_size} per device x {args.grad_accum} accum x {env.world} ranks = "
            f"{global_batch}; {steps_per_epoch} steps/epoch x {args.epochs} epochs = {total} steps")


def train_phase(args, env, build=build_vital, extra_files=None):
    """One curriculum phase. `build` makes the model (demo/pretrain.py passes its own); `extra_files(raw,
    processor)` adds folders to every checkpoint (the pretrained backbone). -> the phase folder."""
    phase_dir = os.path.join(args.out, f"phase{args.phase}")
    if getattr(args, "embedded", False):
        make_embedded_default(args, env)
    records, roi, glob, roi_meta = load_data(args)
    resume_dir = find_resume(args, phase_dir)
    make_tiny_models(args, env)
    torch.manual_seed(args.seed)  # same init on every rank (DDP also broadcasts rank 0's)
    raw, processor, dec_tokenizer, arch = build(args, env, resume_dir, roi.shape[-1] if roi is not None else None)
    src_cfg, init = warm_start(args, raw, arch, resume_dir, env.log)
    if args.grad_ckpt:  # the same gradients (tests/test_ckpt.py), a fraction of the saved activations
        set_checkpointing(raw, True)
    raw.train()
    model = wrap_ddp(raw, env)  # raw is what we save: keys without "module."
    groups, names = param_groups(raw, args)
    opt = torch.optim.AdamW(groups, betas=(0.9, 0.999), eps=1e-8, fused=env.device.type == "cuda")
    sampler, shown = data_order(args, env, records, processor)
    steps_per_epoch = len(sampler) // args.grad_accum
    total, global_batch = max(1, round(args.epochs * steps_per_epoch)), args.batch_size * args.grad_accum * env.world
    log_phase(args, env, records, raw, sampler, total)
    vis_floor = lvis_baselines(roi) if roi is not None else None
    if vis_floor:
        env.log(f"L_vis of a constant on these {len(roi)} samples' targets: the zero vector {vis_floor['zero']:.4f}, "
                f"their mean{' per step' * (roi.ndim == 3)} {vis_floor['mean']:.4f} (below the mean, VP(h_k) reads "
                f"the item); cosine of the mean {vis_floor['mean_cos']:.3f}")
    step = 0
    if resume_dir:
        if src_cfg.get("finished"):
            env.log(f"{resume_dir} already finished its {src_cfg['total_steps']} steps: nothing to do")
            return phase_dir
        check_resumable(resume_dir, src_cfg, env, global_batch, total)
        step = load_trainer(resume_dir, opt, names, env.rank, env.device, TrainError)["step"]
    else:
        torch.manual_seed(args.seed + env.rank)  # per-rank dropout streams (a resume restores them instead)
    config = dict(args=vars(args), phase=args.phase, arch=arch, world_size=env.world, global_batch=global_batch,
                  total_steps=total, backbone_path=os.path.abspath(args.backbone), init=init,
                  decoder_path=os.path.abspath(args.decoder) if raw.decoder is not None else None,
                  lvis_baselines=vis_floor, **data_config(args, records, roi, roi_meta))
    log_path = os.path.join(args.out, "log.jsonl")
    if env.master:
        reset_log(log_path, args.phase, step)

    def save(step):
        rng = gather_rng(env.device, env.world)  # collective: every rank takes part
        if env.master:
            scalars = dict(step=step, world_size=env.world, global_batch=global_batch, total_steps=total)
            extra = {"trainer": trainer_writer(opt, names, rng, scalars, step >= total)}
            extra.update(extra_files(raw, processor) if extra_files else {})
            save_checkpoint(phase_dir, raw, dict(config, step=step, finished=step >= total), extra_files=extra)

    # the sampler's epoch decides which items see their options (and so which bucket they are in)
    batches = (lambda idx: collate(records, idx, processor, dec_tokenizer, (roi, glob),
                                   [shown(i, sampler.epoch) for i in idx]))
    loop = Loop(model, opt, sampler, batches, total, steps_per_epoch, save, log_path, step if resume_dir else None)
    step = train_loop(args, env, loop, step)
    env.log(f"phase {args.phase}: step {step}/{total}, checkpoint in {phase_dir}")
    if vis_floor and env.master:
        last = tail_means(log_path, args.phase, ("L_vis", "cos_vis"))
        if last:
            env.log(f"phase {args.phase}, last {last['n']} steps: L_vis {last['L_vis']:.4f} (zero vector "
                    f"{vis_floor['zero']:.4f}, mean target {vis_floor['mean']:.4f}), cosine of VP(h_k) to its "
                    f"target {last['cos_vis']:.3f} (the mean target's {vis_floor['mean_cos']:.3f})")
    return phase_dir


@dataclass
class Loop:
    """What train_loop drives: the (DDP-wrapped) model and its optimizer, the data order and its batches, the
    phase's length, the checkpoint writer and the log."""
    model: torch.nn.Module
    opt: torch.optim.Optimizer
    sampler: KBucketSampler
    batches: object          # sampler indices -> (batch, K, tokens), see collate
    total: int               # optimizer steps of the phase (the lr schedule spans them all)
    steps_per_epoch: int
    save: object             # save(step): a checkpoint of the phase (collective: every rank calls it)
    log_path: str            # <out>/log.jsonl
    last_saved: int | None = None  # the step of this phase's last checkpoint (None: none yet)


def train_loop(args, env, loop, step):
    """Optimizer steps from `step` to the phase's end (or --max-steps): a log line per step, a checkpoint every
    --save-every, and <out>/loss.png redrawn from log.jsonl at the end."""
    stop = min(loop.total, args.max_steps) if args.max_steps > 0 else loop.total
    device = env.device
    bar = tqdm(total=stop, initial=step, desc=f"phase {args.phase}", disable=not env.master,
               dynamic_ncols=True)
    while step < stop:
        epoch, pos = divmod(step, loop.steps_per_epoch)
        loop.sampler.set_epoch(epoch, start=pos * args.grad_accum)
        it = iter(loop.sampler)
        for _ in range(pos, loop.steps_per_epoch):
            if step >= stop:
                break
            t0 = time.time()
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            stats, gnorm = optimizer_step(args, env, loop, it, step)
            step += 1
            if device.type == "cuda":
                torch.cuda.synchronize(device)  # time the GPU's work, not the launch queue
            if env.master:  # one log.jsonl line per optimizer step: losses, lr, grad norm, speed, peak memory
                dt = time.time() - t0
                write_log_line(loop.log_path, bar, dict(
                    step=step, phase=args.phase, epoch=epoch, L_task=stats[0].item(), L_sem=stats[1].item(),
                    L_vis=stats[2].item(), cos_vis=stats[6].item(), loss=stats[3].item(),
                    lr=loop.opt.param_groups[0]["lr"],
                    grad_norm=gnorm.item(), samples_per_s=stats[4].item() / dt,
                    tokens_per_s=stats[5].item() / dt, peak_mem_mib=round(peak_mib(device), 1)))
            if step % args.save_every == 0 or step == stop:
                loop.save(step)
                loop.last_saved = step
    bar.close()
    if env.master:
        plot_losses(loop.log_path, os.path.join(args.out, "loss.png"))
    return step


def optimizer_step(args, env, loop, it, step):
    """One optimizer step over the next --grad-accum micro-batches of `it`: one all-reduce, grad clipping, the
    lr of `step` (0-based). -> (stats: L_task, L_sem, L_vis, loss as means over micro-batches and ranks,
    samples, tokens, cos_vis (mean); the grad norm). A non-finite loss or gradient stops the run before the update."""
    device, model = env.device, loop.model
    stats = torch.zeros(7, device=device, dtype=torch.float64)
    for micro in range(args.grad_accum):
        batch, K, tokens = loop.batches(next(it))
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
        stats[6] += out["cos_vis"].double() / args.grad_accum
    if env.world > 1:  # every rank's losses, not rank 0's last micro-batch
        dist.all_reduce(stats)
        stats[:4] /= env.world
        stats[6] /= env.world
    params = [p for p in model.parameters() if p.requires_grad]
    gnorm = torch.nn.utils.clip_grad_norm_(params, args.grad_clip if args.grad_clip > 0 else float("inf"))
    if not (torch.isfinite(stats[:4]).all() and torch.isfinite(gnorm)):
        kept = f"last good checkpoint: {args.out}/phase{args.phase} (step {loop.last_saved})" \
            if loop.last_saved is not None else \
            "no checkpoint of this phase was written yet"
        raise TrainError(f"non-finite loss or gradient at phase {args.phase} step {step + 1} (L_task "
                         f"{stats[0].item():.4g}, L_sem {stats[1].item():.4g}, "
                         f"L_vis {stats[2].item():.4g}, "
                         f"grad norm {gnorm.item():.4g}); stopped without saving; {kept}")
    lr_mult = lr_factor(step, loop.total, args.warmup)
    for g in loop.opt.param_groups:
        g["lr"] = g["base_lr"] * lr_mult
    loop.opt.step()
    loop.opt.zero_grad(set_to_none=True)
    return stats, gnorm


def peak_mib(device):
    """Peak memory of this process in MiB: the GPU's allocations, or the CPU's resident set."""
    return (torch.cuda.max_memory_allocated(device) if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 2 ** 20


if __name__ == "__main__":
    try:
        main()
    except TrainError as e:
        sys.exit(f"train.py: error: {e}")
