"""
The walk's evidence (issue 25): on a question that needs several passes, does VITAL's latent loop beat its
own K = 0 model and the pause arm, over several training seeds?

The task: 3 x 3 grids of lesions; "start at the lesion in the upper left cell; a darker lesion sends you one
cell right, a brighter one one cell down, wrapping round; after N moves, which cell are you in?", N = 1..--moves
(4 by default, at most 6). One pass of the tiny 2-layer LLM unrolls about two moves (docs/tuning-log.md), so
3 or more moves need the loop.
Every stage is a documented command, run as a subprocess and skipped when its output is there (re-running
resumes; a phase killed half-way continues with --resume), --jobs at a time, each as soon as what it reads is ready
(embedded/default.run_graph): the runs start once the data and the perception check are done, and a run's evaluation
and state probes run side by side:
  1. data: 6,000 (--n) fixed-start walks of 1 to --moves moves (seed 0) with a mask per move, and their ROI features
     (the shipped pretrained encoder, --tau 0: pooled from the full image's patches under the lesion);
  2. the stand-in backbone (a real run starts from a pretrained Qwen3-VL): the whole tiny backbone trained
     from its random init on 6,000 walks of 1-2 moves of another seed (images and walks unseen by step 1),
     10 epochs, so that it reads one and two moves at 100% (perception first), then frozen;
  3. per seed, the demo's three phases (epochs 4 / 2 / 3, LoRA r 64 / alpha 128) for each arm:
       VITAL  K = the item's moves (--depth own), a visual target per move (--visual-target hop, λ_vis 1 or --lambda-vis)
       K=0    the same LoRA and curriculum, answering directly (--max-k 0)
       pause  VITAL with a learned constant fed back at each step instead of h_{k-1} (--feedback pause)
       task-only  VITAL without its scaffolds (--lambda-sem 0 --lambda-vis 0; not run unless --arms names it)
     each evaluated on the 921 test items (VITAL, pause and task-only at K = the item's moves: --k sample;
     VITAL also with the probes, zeros, h_0 or another item's latents fed back, and its text window: does
     decoded step k state move k?) and its pointing game (evaluate.py --pointing --k sample: does the heatmap of
     VP(h_k) peak on the lesion step k reads?); then demo/diagnose.py --walk's ridge probes of the K = 0 model's
     h_0 (does one pass hold the end cell?) and of VITAL's h_0..h_K (does h_j hold the cell after move j?);
  4. accuracy by number of moves, mean ± sample std over seeds, VITAL minus each baseline against twice the
     pooled std (the issue's test), and "walked or recalled?": accuracy on the 4+ move test items whose nine
     findings and moves a train item shares (a lookup table recalls their end) and on the rest; to
     OUT/results.md, OUT/results.json and demo/walk.md (--moves 6: demo/walk_6_moves.md).
--task order asks the order question instead (prepare_data.py --order-hops): three numbers, reordered by each of
the first N lesions read row by row (a small or large, darker or brighter lesion sends the first number to the end or
swaps two); no sum, pairwise product or lookup of the findings answers it past a few lesions (demo/task_leaks.py
--task s3). Its stand-in is trained on one lesion and on every lesion's look (1,000 images, each asked the first
lesion's order and all nine cells' looks: prepare_data.py --look-cells all; lr 1e-3), so that from the second lesion
on the state must come through the loop, and is then checked on 400 unseen images, cell by cell (perception first:
its results start with that line, and the runs do not start while a cell or the first lesion is read under
--min-perception); a chain holds one step per lesion read and the answer leads with the order's first number
(embedded/grid_questions.order_answer says why); its demo/*.md (and the .json records) are order_*. That stand-in is
shipped (embedded/pretrained/order_pretrain, made once by these stages; stand_ins.json has its sha256 and commands):
it is copied into OUT/pretrain instead of trained (31 min on 2 cores) unless --rebuild-stand-in.
--words order gives the tiny models a tokenizer that keeps the order question's words whole (embedded/tiny.py --words):
the stated question is 84 tokens instead of 185, a chain step 31 instead of 60, and a training step is 1.31x faster
(docs/tuning-log.md, 2026-12-08). The models, the stand-in (shipped too: embedded/pretrained/order_pretrain_words,
12 min on one core) and the stand-in's answers get folders of their own (OUT/models_words, OUT/pretrain_words,
..._words); every arm's runs, results and demo/*.md carry "_words"; models made with the other tokenizer are refused
by name.
--demo is what demo.sh runs (demo/run.py stage 7): the command of the order record with --encoder positional,
--lambda-vis 5 and --words order, VITAL and K = 0, one seed (--seeds), no record of its own; then each figure against
the record's seeds and one test item of 4 lesions explained (OUT/demo.md).
--epochs E1 E2 ... sets the epochs of each phase instead of the curriculum's (stepwise to 4 moves: 4 / 2 / 2 / 3); its
runs, results and demo/*.md carry "_ep<E1-E2-...>" (2 / 2 / 1 / 2 and 1 / 2 / 2 / 2 lost seed 0's loop on the order
question: docs/tuning-log.md, 2026-12-07 eighth).
--curriculum stepwise trains every arm K = 1 first, then one more move per phase (train.py CURRICULA; the first
two phases are the 3-phase runs' own, to the bit), then all walks; its runs, results and demo/*.md carry
"_stepwise". --lambda-sem W sets L_sem's weight in the arms with a decoder (VITAL, pause; their runs, results and
demo/*.md carry "_sem<W>"; the K = 0 runs are shared): on the order question the paper's 1 leaves the decoder's
per-token loss a tenth of the answer's and the lesion-per-step loop forms on one seed of five, 10 on four of five
(docs/tuning-log.md, 2026-12-07 later). --lambda-vis W sets L_vis's weight in the arms with a visual projector (VITAL,
pause; 1 unless set; their runs, results and demo/*.md carry "_vis<W>"): with the positional encoder 5 formed the loop
on every seed of five, 1 on four; at --n 3000 two of four either way (docs/tuning-log.md, 2026-12-07 sixth). --readout cache trains the arms that loop (all but K = 0) with h_K written
into the cache before the answer (train.py --readout; their runs, results and demo/*.md carry "_readcache").
--encoder positional gives the arms with a visual projector (VITAL, pause) the ROI features of a stand-in whose patch
features carry position (embedded/tiny.py --position-scale 3, in OUT/positional_encoder; the data in
OUT/data_positional, whose items every arm reads: the arms without a visual projector read no ROI feature, and the
K = 0 model trains the same weights to the bit from OUT/data): with the shipped encoder a grid's look-alike lesions
cap the pointing game near 77% whatever the latents hold (demo/pointing_bound.py; docs/tuning-log.md, 2026-12-07
fourth); their runs carry "_positional".
--question bare (--task order) asks "After N lesions, in what order do the numbers stand?" without the rule: the rule
is 270 of the stated question's 293 prompt tokens, the same in every item: VITAL trains in 7.3 min instead of 11, the
K = 0 model in 4.1 instead of 7.9, and the loop formed on three seeds of five instead of five (docs/tuning-log.md,
2026-12-07 seventh). The same items, images, chains and answers, in OUT/data_bare (OUT/data_bare_positional); the
stand-in's corpus and perception check keep the stated rule, so the stand-in alone answers the bare question with a
look; every arm's runs, results and demo/*.md carry "_bare".

    python demo/walk.py --seeds 0 1 2 3 4                                    # ~2.5 h on 2 cores (--jobs 2)
    python demo/walk.py --moves 6 --out runs/walk6 --arms VITAL K=0        # 1-6 moves: the K = 0 model's bound
    python demo/walk.py --moves 6 --out runs/walk6 --curriculum stepwise    # one phase per extra move
    python demo/walk.py --task order --moves 6 --out runs/order6 --curriculum stepwise   # the order question
    python demo/walk.py --task order --moves 4 --out runs/order4 --curriculum stepwise --lr-k0 3e-4 --lambda-sem 10 \
        --arms VITAL K=0 pause task-only                                 # the README's order figures
    python demo/walk.py --task order --moves 4 --out runs/order4 --curriculum stepwise --lr-k0 3e-4 --lambda-sem 10 \
        --readout cache --arms VITAL K=0 pause task-only                 # the same with h_K in the cache
    python demo/walk.py --task order --moves 4 --out runs/order4 --curriculum stepwise --lr-k0 3e-4 --lambda-sem 10 \
        --encoder positional --arms VITAL K=0                            # the positional record
    python demo/walk.py --task order --moves 4 --out runs/order4 --curriculum stepwise --lr-k0 3e-4 --lambda-sem 10 \
        --lambda-vis 5 --encoder positional --arms VITAL K=0             # the same at λ_vis 5
    python demo/walk.py --task order --moves 4 --out runs/order4 --curriculum stepwise --lr-k0 3e-4 --lambda-sem 10 \
        --lambda-vis 5 --encoder positional --words order --arms VITAL K=0   # the same, words whole: the demo's record
    python demo/walk.py --task order --moves 4 --out runs/order4 --curriculum stepwise --lr-k0 3e-4 --lambda-sem 10 \
        --lambda-vis 5 --question bare --encoder positional --arms VITAL K=0   # the same, the rule not stated
    python demo/walk.py --demo --out runs/demo/order                    # its seed 0 against that record (~9.5 min)
"""
import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from collections import Counter, defaultdict

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
from demo.ablate import fmt, sh  # noqa: E402
from demo.run import accuracy_by_type, machine  # noqa: E402
from embedded.default import SHIPPED, copy_verified, phase_finished, run_graph  # noqa: E402
from embedded.phantom import cell_name  # noqa: E402
from embedded.tiny import WORDS, make_tokenizer  # noqa: E402
PY = sys.executable
# train.py's curriculum -> the demo's epochs per phase; stepwise (one phase per extra move) skips the phases
# whose cap admits every walk already and warm-starts its last phase from the last one it ran
EPOCHS = {"3-phase": [4, 2, 3], "stepwise": [4, 2, 2, 2, 2, 3]}
HOP = ["--depth", "own", "--visual-target", "hop"]  # and --lambda-vis (1 unless set) in VISUAL_ARMS
# name -> (extra train args, evaluate.py's flags); VITAL's probes feed zeros, h_0 or another item's h_{k-1}
ARMS = {"VITAL": (HOP, ["--k", "sample", "--probe", "--text-window", "--pointing"]),
        "K=0": (["--max-k", "0"], ["--k", "0"]),
        "pause": (HOP + ["--feedback", "pause"], ["--k", "sample"]),
        "task-only": (["--depth", "own", "--lambda-sem", "0", "--lambda-vis", "0"], ["--k", "sample"])}
PROBES = ["normal", "zero", "h0", "shuffled"]
DECODER_ARMS = ("VITAL", "pause")  # the arms that train the auxiliary decoder: --lambda-sem changes only these
VISUAL_ARMS = ("VITAL", "pause")  # the arms that regress ROI features (L_vis): --encoder changes only these
ENCODERS = {"pretrained": "embedded/pretrained/encoder_pretrained",  # the demo's stand-in for MedSigLIP
            "positional": "positional_encoder/encoder"}  # under --out: embedded/tiny.py --position-scale 3
# the arms whose states demo/diagnose.py --walk probes: the K = 0 model's h_0 (does one pass hold the end?) and
# VITAL's h_0..h_K (does latent step j hold move j?), with diagnose.py's flags, the run's checkpoint after them
STATE_PROBES = {"K=0": ["--ckpt", "", "--k0"], "VITAL": ["--ckpt"]}


# --demo (demo.sh's stage 7, demo/run.py): the order question with the record's command, one seed, no record of its
# own; the figures are read against the record's seeds and one test item of 4 lesions is explained
DEMO = ["--task", "order", "--moves", "4", "--curriculum", "stepwise", "--lr-k0", "3e-4", "--lambda-sem", "10",
        "--lambda-vis", "5", "--encoder", "positional", "--words", "order", "--arms", "VITAL", "K=0", "--seeds", "0",
        "--no-record"]
DEMO_RECORD = os.path.join(HERE, "order_stepwise_sem10_vis5_positional_words.json")  # its record of DEMO, seeds 0-4


def get_args(argv=None):
    ap = argparse.ArgumentParser(description="the walk's evidence: VITAL vs K = 0 vs pause over seeds")
    ap.add_argument("--out", help="data, stand-in, run folders and results (default runs/<task>, runs/demo/order "
                                  "with --demo)")
    ap.add_argument("--models", default="runs/walk/models", help="tiny models (embedded/tiny.py; made if absent)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4], help="training seeds")
    ap.add_argument("--moves", type=int, default=4, choices=range(1, 7), help="the longest walk (walks of 1 to "
                                                                               "--moves moves, equally many)")
    ap.add_argument("--n", type=int, default=6000, help="items of the data (train/val/test split as prepare_data.py "
                                                       "splits them)")
    ap.add_argument("--arms", nargs="+", default=["VITAL", "K=0", "pause"], choices=list(ARMS))
    ap.add_argument("--lr", type=float, default=1e-3, help="peak lr of every arm (3e-3 wrecks the stand-in's "
                                                           "two-move path: docs/tuning-log.md)")
    ap.add_argument("--lr-k0", type=float, help="the K = 0 arm's own lr (default --lr)")
    ap.add_argument("--task", default="walk", choices=["walk", "order"],
                    help="walk: the 3 x 3 walk from the upper left cell; order: three numbers reordered by each "
                         "lesion in reading order (prepare_data.py --order-hops; a state machine that does not "
                         "commute), its stand-in trained on one lesion and on every lesion's look")
    ap.add_argument("--curriculum", default="3-phase", choices=list(EPOCHS),
                    help="every arm's schedule (train.py CURRICULA); stepwise: K = 1, then one more move per "
                         "phase, then all walks (its runs, results and demo/*.md carry the name)")
    ap.add_argument("--epochs", type=float, nargs="+",
                    help="the epochs of each phase the curriculum trains, instead of its own (EPOCHS; stepwise to 4 "
                         "moves trains 4: K <= 1, 2, 3, then every item); every arm's runs, results and demo/*.md "
                         "carry _ep<E1-E2-...>")
    ap.add_argument("--lambda-sem", type=float, help="L_sem's weight in the arms with a decoder (VITAL, pause; default "
                                                      "train.py's 1, the paper's); their runs, results and demo/*.md "
                                                      "carry _sem<value>, the K = 0 runs are shared")
    ap.add_argument("--lambda-vis", type=float, default=1.0,
                    help="L_vis's weight in the arms with a visual projector (VITAL, pause); other than 1, their runs, "
                         "results and demo/*.md carry _vis<value>, the K = 0 and task-only runs are shared")
    ap.add_argument("--readout", default="head", choices=["head", "cache"],
                    help="train.py --readout of the arms that loop (all but K = 0): head (eq. 2) or cache (h_K "
                         "written to the cache before the answer); cache: their runs, results and demo/*.md carry "
                         "_readcache")
    ap.add_argument("--encoder", default="pretrained", choices=list(ENCODERS),
                    help="the ROI encoder of the arms with a visual projector (VITAL, pause): pretrained (the shipped "
                         "stand-in) or positional (the random tiny SigLIP with its position embeddings x3, whose patch "
                         "features tell look-alike lesions apart: docs/tuning-log.md); positional: their data, runs, "
                         "results and demo/*.md carry _positional")
    ap.add_argument("--question", default="stated", choices=["stated", "bare"],
                    help="--task order: the question's wording (prepare_data.py --order-question): stated (the rule in "
                         "every question, 293 prompt tokens) or bare (\"After N lesions, in what order do the numbers "
                         "stand?\", 23 tokens: a training step takes half the time); the stand-in's corpus and its "
                         "perception check keep the stated rule; bare: every arm's data, runs, results and demo/*.md "
                         "carry _bare")
    ap.add_argument("--words", default="tiny", choices=list(WORDS),
                    help="the tiny models' tokenizer (embedded/tiny.py --words): tiny, or order (the order question's "
                         "words kept whole: its stated question 84 tokens instead of 185, a chain step 31 instead of "
                         "60); order: the models, the stand-in and every arm's runs, results and demo/*.md carry _words")
    ap.add_argument("--rebuild-stand-in", action="store_true",
                    help="--task order: train the stand-in here (31 min on 2 cores) instead of copying the shipped one "
                         "(embedded/pretrained/order_pretrain, made by these stages)")
    ap.add_argument("--no-record", action="store_true",
                    help="write the results under --out only, not to demo/<task>*.md (a run of fewer seeds than the "
                         "record, e.g. the demo's)")
    ap.add_argument("--jobs", type=int, default=2,
                    help="stages and runs at once, one thread each (OMP_NUM_THREADS=1, the records' count on any "
                         "machine: two threads train other weights)")
    ap.add_argument("--min-perception", type=float, default=90.0,
                    help="--task order: stop before the runs unless the stand-in reads the first lesion's order and "
                         "every cell's look at this %% or more on unseen images (0: run anyway)")
    ap.add_argument("--demo", action="store_true",
                    help="the demo's order question: " + " ".join(DEMO) + " (flags after it override), then the "
                         "figures against the record's seeds and one explained test item, to OUT/demo.md")
    argv = sys.argv[1:] if argv is None else list(argv)
    demo = "--demo" in argv
    args = ap.parse_args(DEMO + argv if demo else argv)
    args.out = args.out or ("runs/demo/order" if demo else f"runs/{args.task}")
    if demo and "--models" not in argv:
        args.models = os.path.join(args.out, "models")
    if "--models" not in argv:  # the default folder of other words' models is their own
        args.models += words_tag(args)
    if args.question != "stated" and args.task != "order":
        ap.error("--question words the order question: it needs --task order")
    if args.curriculum == "stepwise" and args.moves < 2:
        ap.error("--curriculum stepwise needs --moves 2 or more (its phases add one move each)")
    n = len(phases(argparse.Namespace(**dict(vars(args), epochs=None))))
    if args.epochs and (len(args.epochs) != n or min(args.epochs) <= 0):
        ap.error(f"--epochs takes one positive number per phase: --curriculum {args.curriculum} --moves "
                 f"{args.moves} trains {n} phases")
    return args


ORDER_STAND_IN = "order_pretrain"  # its entry in embedded/pretrained/stand_ins.json: this script's stages 2, run once


def copy_stand_in(args, shipped=SHIPPED):
    """--task order: copy the shipped stand-in (embedded/pretrained/order_pretrain(_words), what stages() would train:
    31 min on 2 cores) into OUT/pretrain(_words), as demo/run.py copies its two; not when that folder exists (a
    finished or resumable stage) or with --rebuild-stand-in. A file whose sha256 is not the manifest's is refused by
    name, before anything is copied (embedded/default.copy_verified). -> True if copied."""
    dst, name = stand_in_dir(args), ORDER_STAND_IN + words_tag(args)
    if args.task != "order" or args.rebuild_stand_in or os.path.exists(dst):
        return False
    with open(os.path.join(shipped, "stand_ins.json")) as f:
        files = json.load(f)[name]["files"]
    copy_verified(shipped, name, files, dst, "demo/walk.py", "--rebuild-stand-in")
    print(f"[copy] the shipped stand-in {os.path.join(shipped, name)} -> {dst}", flush=True)
    return True


def stages(args):
    """(command, the file that says it is done) for the inputs every run shares: named_stages without the names."""
    return [(cmd, done) for _, cmd, done, _ in named_stages(args)]


def named_stages(args):
    """stages() with each stage's name and the names of the stages it reads: [(name, command, done, deps)]."""
    d, pre = data_dir(args), os.path.join(args.out, "pretrain_data")
    grid = ["--source", "phantom", "--image-size", "96"]
    if args.task == "walk":
        walk = grid + ["--walk-start", "upper left"]
        data, stand_in = walk + ["--walk-hops", str(args.moves)], walk + ["--n", "6000", "--walk-hops", "2"]
    else:  # the stand-in reads one lesion (the first, for the question) and every lesion's look, at K = 0, at lr
        # 1e-3 (one cell asked per image on 3,000 images at 3e-3: 18-40% off the upper left cell; nine per image at
        # 3e-3: 29-59%; nine at 1e-3: 100% on every cell; docs/tuning-log.md)
        bare = ["--order-question", "bare"] if args.question == "bare" else []
        data, stand_in = grid + ["--order-hops", str(args.moves)] + bare, grid + ["--n", "1000", "--order-hops", "1",
                                                                           "--types", "order", "look",
                                                                           "--look-cells", "all"]
    encoder = ENCODERS["pretrained"] if args.encoder == "pretrained" else os.path.join(args.out, ENCODERS[args.encoder])
    positional = [("encoder", [PY, "embedded/tiny.py", os.path.dirname(encoder), "--position-scale", "3"],
                   os.path.join(encoder, "config.json"), [])] if args.encoder == "positional" else []
    # one data folder, with the ROI features of the arms' encoder: the arms without a visual projector read none (the
    # K = 0 model trains the same weights, to the bit, from a folder of the other encoder's features)
    folders = {d: encoder}
    tiny = ("models", [PY, "embedded/tiny.py", args.models] + (["--words", args.words] if words_tag(args) else []),
            os.path.join(args.models, "encoder", "config.json"), [])
    stand_in_done = os.path.join(stand_in_dir(args), "phase1", "backbone", "config.json")
    return [tiny] + positional + [
            stage for dd, enc in folders.items() for stage in (
                (f"data {dd}", [PY, "prepare_data.py", "--out", dd, "--n", str(args.n), "--seed", "0"] + data,
                 os.path.join(dd, "stats.json"), []),
                (f"roi {dd}", [PY, "extract_roi.py", "--samples", os.path.join(dd, "samples.jsonl"), "--out",
                               os.path.join(dd, "roi.safetensors"), "--encoder", enc, "--tau", "0", "--quiet"],
                 os.path.join(dd, "roi.safetensors"), [f"data {dd}"] + (["encoder"] if positional and enc == encoder
                                                                       else [])))] + [
            ("corpus", [PY, "prepare_data.py", "--out", pre, "--seed", "1", "--test-frac", "0", "--val-frac", "0"]
             + stand_in, stand_in_done if os.path.isfile(stand_in_done) else os.path.join(pre, "stats.json"), []),
            ("stand-in", [PY, "demo/pretrain.py", "--data", pre, "--models", args.models, "--out",
                          stand_in_dir(args), "--epochs", "10",
                          "--lr", "3e-3" if args.task == "walk" else "1e-3"]
             + (["--resume"] if os.path.isdir(os.path.join(stand_in_dir(args), "phase1")) else []),
             stand_in_done, ["corpus", "models"]),
            ("alone", [PY, "evaluate.py", "--ckpt", os.path.join(stand_in_dir(args), "phase1"), "--data",
                       d, "--out", stand_in_alone(args), "--k", "0"],
             os.path.join(stand_in_alone(args), "metrics.json"), ["stand-in", f"roi {d}"]),
            ("pointing bound", [PY, "demo/pointing_bound.py", "--data", d], os.path.join(d, "pointing_bound.json"),
             [f"roi {d}"])
            ] + perception_stages(args)


def perception_stages(args):
    """Perception first (the issue): the stand-in alone, at K = 0, on 400 images of a seed neither the data nor the
    stand-in saw, each asked one lesion's look (any of the nine) and the first lesion's order; none for the walk.
    [(name, command, done, deps)] as named_stages."""
    if args.task != "order":
        return []
    d, ev = os.path.join(args.out, "perception_data"), perception_dir(args)
    return [("perception data", [PY, "prepare_data.py", "--out", d, "--n", "400", "--seed", "2", "--source",
                                 "phantom", "--image-size", "96", "--order-hops", "1", "--types", "order", "look",
                                 "--test-frac", "1", "--val-frac", "0"], os.path.join(d, "stats.json"), []),
            ("perception", [PY, "evaluate.py", "--ckpt", os.path.join(stand_in_dir(args), "phase1"), "--data", d,
                            "--out", ev, "--k", "0"], os.path.join(ev, "metrics.json"),
             ["perception data", "stand-in", "models"])]


def perception_figures(args):
    """-> (look %, order after the first lesion %, {cell: look %}): the stand-in alone on perception_stages'
    questions, the look question also cell by cell (pooled, a stand-in that reads only the upper left cell still
    scores a third)."""
    samples = [json.loads(l) for l in open(os.path.join(args.out, "perception_data", "samples.jsonl")) if l.strip()]
    preds = os.path.join(perception_dir(args), "predictions.jsonl")
    acc = {t: 100 * c / n for t, (c, n) in accuracy_by_type(preds, samples).items()}
    looks = [dict(s, cell=s["meta"]["drawn"]["look_cell"]) for s in samples if s["question_type"] == "look"]
    by_cell = accuracy_by_type(preds, looks, "cell")  # the order items fall under '?', and 'all' is every item
    return acc["look"], acc["order"], {c: 100 * k / n for c, (k, n) in sorted(by_cell.items()) if c not in ("?", "all")}


def perception(args):
    """-> a line of the results: the stand-in's perception ('' for the walk)."""
    if args.task != "order":
        return ""
    look, order, cells = perception_figures(args)
    worst = min(cells, key=cells.get)
    return (f"Perception first: the stand-in alone (K = 0) on 400 unseen images reads one lesion's size and brightness "
            f"(any of the nine; chance 25%) at {look:.1f}% ({worst} cell {cells[worst]:.1f}%, upper left "
            f"{cells.get('upper left', float('nan')):.1f}%) and answers the order after the first lesion at "
            f"{order:.1f}%. By cell: " + ", ".join(f"{c} {a:.0f}" for c, a in cells.items()) + ".\n\n")


def check_data_size(args):
    """A data folder made for another task, --n or --moves would be reused silently (its stage is skipped when
    stats.json is there). -> an error message naming the file, or None."""
    path = os.path.join(data_dir(args), "stats.json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        stats = json.load(f)
    have = (sorted(stats["by_question_type"]), stats["samples"], max(int(k) for k in stats["by_K"]))
    if have != ([args.task], args.n, args.moves):
        return (f"{path} holds {have[1]} {'/'.join(have[0])} items of up to {have[2]} moves, not --task "
                f"{args.task} --n {args.n} --moves {args.moves}: pass another --out")
    return None


def check_perception(args):
    """Perception first (the issue): a stand-in that cannot read some cell's lesion caps every arm at chance from the
    lesion it cannot read on, and the runs would measure nothing (80 minutes). -> an error message, or None."""
    if args.task != "order" or args.min_perception <= 0:
        return None
    _, order, cells = perception_figures(args)
    low = {c: a for c, a in cells.items() if a < args.min_perception}
    if order >= args.min_perception and not low:
        return None
    return (f"the stand-in ({os.path.join(args.out, 'pretrain')}) reads the first lesion's order at {order:.1f}% and "
            f"the look of the lesion in the " + ", ".join(f"{c} cell at {a:.1f}%" for c, a in low.items())
            + f", under --min-perception {args.min_perception:g}: every arm would be capped from the lesion it "
            f"cannot read on. Train a stand-in that reads every cell, or pass --min-perception 0 to run anyway.")


DEEP = 4  # the multi-hop questions: p >= 4 hops, more than a 2-layer LLM unrolls in one pass


def with_deep(counts):
    """{moves or 'all': (right, n)} -> {...: %}, plus 'deep': the items of DEEP or more moves pooled, and 'multi':
    those of 2 or more (the items one pass cannot answer on the order question; each when any)."""
    pooled = {}
    for key, least in (("deep", DEEP), ("multi", 2)):
        some = [cn for m, cn in counts.items() if m != "all" and m >= least]
        if some:
            pooled[key] = (sum(c for c, _ in some), sum(n for _, n in some))
    return {k: 100 * c / n for k, (c, n) in {**counts, **pooled}.items()}


def moves(s):
    """A sample's moves (lesions read, on an order grid): its latent steps."""
    return s["latent_steps"]


def by_moves(pred_path, samples):
    """-> {moves (1..--moves), 'deep' and 'all': accuracy %} from evaluate.py's predictions.jsonl."""
    return with_deep(accuracy_by_type(pred_path, [dict(s, moves=moves(s)) for s in samples], "moves"))


def window_by_moves(tw_path, samples):
    """-> {'window <moves>', 'window deep' and 'window all': % of test items whose decoded steps state every
    move} from evaluate.py's text_window.json (an item with no scored step counts as stating none)."""
    moves_of = {s["id"]: moves(s) for s in samples if s["split"] == "test"}
    steps = defaultdict(list)
    for st in json.load(open(tw_path))["items"]:
        if st["right"] is not None:
            steps[st["id"]].append(st["right"])
    right = defaultdict(list)
    for i, m in moves_of.items():
        right[m].append(bool(steps[i]) and all(steps[i]))
    right["all"] = [r for m in list(right) for r in right[m]]
    return {f"window {m}": v for m, v in with_deep({m: (sum(v), len(v)) for m, v in right.items()}).items()}


def pointing(path):
    """evaluate.py's pointing.json -> {'pointing step <k>', 'pointing best', 'pointing chance', 'pointing ceiling'}:
    % of the items with a step k whose heatmap of VP(h_k) peaks on the lesion step k reads."""
    pg = json.load(open(path))
    flat = {f"pointing step {r['k']}": r["hit_rate"] for r in pg["steps"]}
    flat.update({"pointing best": pg["best_hit_rate"], "pointing chance": pg["chance"]})
    return flat | ({"pointing ceiling": pg["ceiling"]} if pg.get("ceiling") is not None else {})


def blind(samples):
    """-> {moves: %}: the most common end cell among the test items of that move count (the rule known, the
    image not seen)."""
    ends = defaultdict(Counter)
    for s in samples:
        if s["split"] == "test":
            ends[moves(s)][s["answer"]] += 1
    return {m: 100 * c.most_common(1)[0][1] / sum(c.values()) for m, c in ends.items()}


def tag(args, arm="VITAL"):
    """The suffix of a run folder, results file and demo/*.md: none for the demo's 3-phase schedule, the
    paper's λ_sem, λ_vis 1, read-out, wording and encoder; --lambda-sem only in the arms it changes (those with a
    decoder), --lambda-vis and --encoder in those with a visual projector, --readout in those that loop (all but
    K = 0), --question bare in every arm (the data differ)."""
    sem = args.lambda_sem is not None and arm in DECODER_ARMS
    vis = args.lambda_vis != 1 and arm in VISUAL_ARMS
    cache = args.readout != "head" and arm != "K=0"
    return (("" if args.curriculum == "3-phase" else f"_{args.curriculum}") + epochs_tag(args)
            + (f"_sem{args.lambda_sem:g}" if sem else "")
            + (f"_vis{args.lambda_vis:g}" if vis else "") + ("_readcache" if cache else "") + question_tag(args)
            + encoder_tag(args, arm) + words_tag(args))


def epochs_tag(args):
    """'_ep2-2-1-2' for --epochs 2 2 1 2 (every arm: the schedule is theirs), else ''."""
    return "_ep" + "-".join(f"{e:g}" for e in args.epochs) if args.epochs else ""


def encoder_tag(args, arm="VITAL"):
    """'_positional' for the arms with a visual projector under --encoder positional, else ''."""
    return f"_{args.encoder}" if args.encoder != "pretrained" and arm in VISUAL_ARMS else ""


def data_dir(args):
    """The data folder every arm trains on and the tables read: OUT/data (OUT/data_bare with --question bare) with the
    shipped encoder's ROI features, or with --encoder positional OUT/data_positional with that encoder's (the arms
    without a visual projector read no ROI feature: the K = 0 model's weights are the same to the bit from either)."""
    return os.path.join(args.out, "data" + question_tag(args) + ("_positional" if args.encoder == "positional" else ""))


def question_tag(args):
    """'_bare' for the order question asked without its rule (--question bare), else ''."""
    return "_bare" if args.question == "bare" else ""


def check_models(args):
    """-> why --models cannot serve --words ('' if it can, or is not made yet): its vocabulary is another tokenizer's."""
    config = os.path.join(args.models, "backbone", "config.json")
    if not os.path.isfile(config):
        return ""
    with open(config) as f:
        have = json.load(f)["text_config"]["vocab_size"]
    want = len(make_tokenizer(*WORDS[args.words]))
    if have == want:
        return ""
    other = [w for w in WORDS if len(make_tokenizer(*WORDS[w])) == have]
    return (f"{config}: a vocabulary of {have} tokens{f' (--words {other[0]})' if other else ''}, not the {want} of "
            f"--words {args.words}; give --models a folder of its own")


def words_tag(args):
    """'_words' for tiny models whose tokenizer keeps the order question's words whole (--words order), else ''."""
    return "" if args.words == "tiny" else "_words"


def stand_in_dir(args):
    """The stand-in backbone's run: OUT/pretrain (OUT/pretrain_words with --words order: the tokenizer is its own)."""
    return os.path.join(args.out, "pretrain" + words_tag(args))


def stand_in_alone(args):
    """The stand-in's own answers to the data's questions (K = 0, no LoRA): OUT/stand_in_alone(_bare)(_words)."""
    return os.path.join(args.out, "stand_in_alone" + question_tag(args) + words_tag(args))


def perception_dir(args):
    """The stand-in's answers to the perception check: OUT/stand_in_perception(_words)."""
    return os.path.join(args.out, "stand_in_perception" + words_tag(args))


def phases(args):
    """-> [(phase, epochs, warm-start phase: None for the one before, 'none' for from scratch)]: the phases of
    --curriculum a run trains. stepwise: phases 1 .. moves - 1 (K <= phase), then the last (every walk) from the
    last one it ran."""
    ep = EPOCHS[args.curriculum]
    if args.curriculum == "3-phase":
        run = [(p, e, None) for p, e in enumerate(ep, 1)]
    else:
        first = [(p, ep[p - 1], None) for p in range(1, min(args.moves, len(ep)))]
        run = first + [(len(ep), ep[-1], None if first[-1][0] == len(ep) - 1 else first[-1][0])]
    return [(p, e, init) for (p, _, init), e in zip(run, args.epochs)] if args.epochs else run


def pattern(s):
    """All an item's end depends on: a walk's nine findings (each lesion darker or not) and its number of moves;
    an order item's looks of the lesions it reads (size and brightness)."""
    d = s["meta"]["drawn"]
    if "sizes" in d:
        return tuple(d["sizes"][i // 3][i % 3] + d["grid"][i // 3][i % 3] for i in range(d["hops"]))
    return tuple(x == "darker" for row in d["grid"] for x in row), d["hops"]


def memory_groups(samples):
    """Walked or recalled? The test items of DEEP or more moves split by whether a train item has the same
    pattern (a model could recall that item's end instead of walking; the nine findings give only 512 patterns).
    -> ({id: 'seen' | 'unseen'}, {'seen' | 'unseen': (right, n) of a lookup table: the most common end of the
    train items with the same pattern, else the most common end of the train items with as many moves})."""
    ends, by_moves = defaultdict(Counter), defaultdict(Counter)
    for s in samples:
        if s["split"] == "train":
            ends[pattern(s)][s["answer"]] += 1
            by_moves[moves(s)][s["answer"]] += 1
    group, lookup = {}, defaultdict(lambda: [0, 0])
    for s in samples:
        if s["split"] == "test" and moves(s) >= DEEP:
            g = group[s["id"]] = "seen" if pattern(s) in ends else "unseen"
            recalled = (ends[pattern(s)] if g == "seen" else by_moves[moves(s)]).most_common(1)[0][0]
            lookup[g][0] += recalled == s["answer"]
            lookup[g][1] += 1
    return group, {g: tuple(v) for g, v in lookup.items()}


def by_memory(pred_path, samples, group):
    """-> {'memory seen' / 'memory unseen': accuracy %} on the DEEP+ move test items (memory_groups)."""
    tagged = [dict(s, memory=group[s["id"]]) for s in samples if s["id"] in group]
    return {f"memory {g}": 100 * c / n
            for g, (c, n) in accuracy_by_type(pred_path, tagged, "memory").items() if g in ("seen", "unseen")}


def arm_lr(args, arm):
    return args.lr_k0 if arm == "K=0" and args.lr_k0 else args.lr


def run_folder(args, arm, seed):
    """OUT/<arm>_lr<lr><tag>/s<seed>: a new lr or setting is a new run."""
    return os.path.join(args.out, f"{arm.replace('=', '')}_lr{arm_lr(args, arm):g}{tag(args, arm)}", f"s{seed}")


def eval_dir(args, arm, seed):
    return os.path.join(run_folder(args, arm, seed), "eval")


def evaluated(args, arm, seed):
    """Has the run's evaluation written every file of its arm's evaluate.py flags?"""
    flags = ARMS[arm][1]
    files = ["metrics.json"] + [f for flag, f in (("--probe", "probes.json"), ("--text-window", "text_window.json"),
                                                  ("--pointing", "pointing.json")) if flag in flags]
    return all(os.path.isfile(os.path.join(eval_dir(args, arm, seed), f)) for f in files)


def last_phase(args, arm, seed):
    return os.path.join(run_folder(args, arm, seed), f"phase{phases(args)[-1][0]}")


def train_run(args, arm, seed, env):
    """Train one arm under one seed, phase by phase (a finished phase is skipped, one killed half-way resumes); not
    when its evaluation is already there."""
    extra = ARMS[arm][0]
    lr = arm_lr(args, arm)
    run_dir = run_folder(args, arm, seed)
    if evaluated(args, arm, seed):
        return
    os.makedirs(run_dir, exist_ok=True)
    log = os.path.join(run_dir, "commands.log")
    for p, ep, init in phases(args):
        phase_dir = os.path.join(run_dir, f"phase{p}")
        if not phase_finished(phase_dir):
            sh([PY, "train.py", "--data", data_dir(args), "--preset", "tiny", "--models", args.models, "--out",
                run_dir, "--backbone", os.path.join(stand_in_dir(args), "phase1", "backbone"), "--phase", str(p),
                "--epochs", f"{ep:g}", "--lora-r", "64", "--lora-alpha", "128", "--lr", f"{lr:g}",
                "--seed", str(seed), "--curriculum", args.curriculum] + extra
               + (["--lambda-vis", f"{args.lambda_vis:g}"] if arm in VISUAL_ARMS else [])
               + (["--lambda-sem", f"{args.lambda_sem:g}"] if args.lambda_sem is not None and arm in DECODER_ARMS
                  else [])
               + (["--readout", args.readout] if args.readout != "head" and arm != "K=0" else [])
               + (["--init", "none" if init == "none" else os.path.join(run_dir, f"phase{init}")] if init else [])
               + (["--resume"] if os.path.isdir(phase_dir) else []), env, log)


def evaluate_run(args, arm, seed, env):
    """evaluate.py on the run's last phase with the arm's flags, unless done. -> True if it ran."""
    if evaluated(args, arm, seed):
        return False
    t0 = time.time()
    sh([PY, "evaluate.py", "--ckpt", last_phase(args, arm, seed), "--data", data_dir(args), "--out",
        eval_dir(args, arm, seed)]
       + ARMS[arm][1], env, os.path.join(run_folder(args, arm, seed), "commands.log"))
    print(f"[done] {arm} seed {seed}, evaluated in {time.time() - t0:.0f}s", flush=True)
    return True


def state_probe_run(args, arm, seed, env):
    """demo/diagnose.py --walk on the run's states (STATE_PROBES), unless done."""
    out = os.path.join(eval_dir(args, arm, seed), "walk_probes.json")
    if arm in STATE_PROBES and not os.path.isfile(out):
        sh([PY, "demo/diagnose.py", "--walk", "--data", data_dir(args), "--out", out]
           + STATE_PROBES[arm] + [last_phase(args, arm, seed)], env,
           os.path.join(run_folder(args, arm, seed), "commands.log"))


class PerceptionError(Exception):
    """check_perception's message: the stand-in cannot read what every arm would need."""


def graph(args, env, explain=None):
    """Every stage and run as run_graph nodes, in the order a free core takes them: first what VITAL's first run
    reads (the models, the stand-in, the data and its ROI features, the perception check), then the runs seed by
    seed (train, then evaluation and state probes side by side), and last what only the tables read. Every stage
    gets env (one thread): two stages of two threads each on two cores took 2-5x their time (extract_roi: 124 s
    against 23; its features are the same to the bit on one thread).
    explain: a callable run after the first seed's VITAL (--demo)."""
    named = {name: (cmd, done, deps) for name, cmd, done, deps in named_stages(args)}

    def stage(name):
        cmd, done, deps = named[name]

        def go():
            if not os.path.exists(done):
                print("$ " + " ".join(shlex.quote(c) for c in cmd), flush=True)
                subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL, env=env)
        return name, go, deps

    def check():
        if why := check_perception(args):
            raise PerceptionError(why)

    nodes, added = [], set()

    def add(*names):
        for n in names:
            if n in named and n not in added:
                nodes.append(stage(n))
                added.add(n)

    add("models", "corpus", "stand-in", "encoder", f"data {data_dir(args)}", f"roi {data_dir(args)}",
        "perception data", "perception")
    nodes.append(("perception check", check, ["perception"] if "perception" in named else []))
    for s in args.seeds:  # seed-major: a partial run still covers every arm
        for a in args.arms:
            run = f"{a} s{s}"
            nodes += [(f"train {run}", lambda a=a, s=s: train_run(args, a, s, env),
                       ["models", "stand-in", f"roi {data_dir(args)}", "perception check"]),
                      (f"evaluate {run}", lambda a=a, s=s: evaluate_run(args, a, s, env), [f"train {run}"]),
                      (f"state probes {run}", lambda a=a, s=s: state_probe_run(args, a, s, env), [f"train {run}"])]
            if explain and a == "VITAL" and s == args.seeds[0]:
                nodes.append(("explain", explain, [f"train {run}"]))
    add(*named)
    return nodes


def state_probes(path):
    """diagnose.py --walk's JSON -> flat {name: %}: 'end h0 <m>', 'end bits <m>', 'end majority <m>' (the end
    cell by moves, from h_0, from the nine true brightness bits, the majority), 'brightness h0', and for a
    model with a loop 'move <j> h<k>' (the cell after move j from h_0 and from h_j). 'deep' entries average
    the move counts >= DEEP."""
    wp, flat = next(iter(json.load(open(path)).values())), {}
    for m, v in wp["end"].items():
        flat.update({f"end h0 {m}": v["h"][0], f"end bits {m}": v["findings_linear"], f"end majority {m}": v["majority"]})
    for kind in ("h0", "bits", "majority"):
        deep = [flat[f"end {kind} {m}"] for m in wp["end"] if int(m) >= DEEP]
        if deep:
            flat[f"end {kind} deep"] = statistics.mean(deep)
    flat["brightness h0"] = wp["brightness"]["h"][0]
    if len(wp["brightness"]["h"]) > 1:
        for j, v in wp["after_move"].items():
            flat.update({f"move {j} h0": v["h"][0], f"move {j} h{j}": v["h"][int(j)],
                         f"move {j} bits": v["findings_linear"], f"move {j} majority": v["majority"]})
    return flat


def tables(res, blind_pct, alone, args, lookup=None):
    """res: arm -> seed -> {moves or 'all': %}. Markdown: accuracy by moves per arm, then VITAL minus each
    baseline with the issue's test (>= 15 points and > 2 pooled std)."""
    moves = list(range(1, args.moves + 1))
    cols = moves + (["deep"] if args.moves > DEEP else []) + ["all"]
    label = lambda c: f"{DEEP}-{args.moves}" if c == "deep" else c  # a row of the difference tables
    name = lambda c: "all" if c == "all" else f"{label(c)} move{'s' if c != 1 else ''}"  # a column
    get = lambda arm, c: [res[arm][s][c] for s in sorted(res.get(arm, {}))]
    sd = lambda v: statistics.stdev(v) if len(v) > 1 else 0.0
    out = ["Accuracy (%) on the walk's test items by number of moves, mean ± sample std over training seeds "
           f"{', '.join(map(str, sorted({s for v in res.values() for s in v})))} (per seed after); lr "
           f"{args.lr:g}" + (f", K = 0 arm {args.lr_k0:g}" if args.lr_k0 else "") + ".", "",
           "| arm | " + " | ".join(name(c) for c in cols) + " | all, per seed |",
           "|---|" + "---:|" * len(cols) + "---|"]
    for arm in ARMS:
        if arm in res:
            out.append(f"| {arm} | " + " | ".join(fmt(get(arm, c)) for c in cols) + " | "
                       + " / ".join(f"{v:.1f}" for v in get(arm, "all")) + " |")
    if alone:
        out.append("| stand-in alone (no LoRA, K = 0) | " + " | ".join(f"{alone.get(c, 0):.1f}" for c in cols)
                   + " | |")
    out.append("| blind (the most common end cell) | " + " | ".join(f"{blind_pct[m]:.1f}" for m in moves)
               + " |" * (len(cols) - len(moves) + 2))
    for other in ("K=0", "pause", "task-only"):
        if "VITAL" not in res or other not in res:
            continue
        out += ["", f"**VITAL minus {other}** (points; pooled std = sqrt((s1² + s2²) / 2); the issue asks > 2 "
                "pooled std of both baselines, and >= 15 points of the K = 0 model)", "",
                "| moves | difference of means | pooled std | > 2 pooled std | and >= 15 | per seed |",
                "|---|---:|---:|---|---|---|"]
        for c in cols:
            a, b = get("VITAL", c), get(other, c)
            diff, pooled = statistics.mean(a) - statistics.mean(b), ((sd(a) ** 2 + sd(b) ** 2) / 2) ** 0.5
            paired = [res["VITAL"][s][c] - res[other][s][c] for s in sorted(res["VITAL"]) if s in res[other]]
            two = diff > 2 * pooled
            out.append(f"| {label(c)} | {diff:+.1f} | {pooled:.1f} | {'yes' if two else 'no'} | "
                       f"{'yes' if two and diff >= 15 else 'no'} | " + " / ".join(f"{x:+.1f}" for x in paired) + " |")
    if "VITAL" in res and all("probe normal" in r for r in res["VITAL"].values()):
        base = statistics.mean(get("VITAL", "probe normal"))
        out += ["", "**Do VITAL's latents matter?** (evaluate.py --probe at K = the item's moves: the same answer "
                "with each latent step fed zeros, h_0, or the h_{k-1} of another item of the same K)", "",
                "| fed back | accuracy | change | per seed |", "|---|---:|---:|---|"]
        out += [f"| {n} | {fmt(get('VITAL', 'probe ' + n))} | {statistics.mean(get('VITAL', 'probe ' + n)) - base:+.1f}"
                " | " + " / ".join(f"{v:.1f}" for v in get("VITAL", "probe " + n)) + " |" for n in PROBES]
        out.append("McNemar's p of shuffled against normal, per seed: "
                   + " / ".join(f"{v:.2g}" for v in get("VITAL", "p shuffled")) + ".")
    if "VITAL" in res and all("window all" in r for r in res["VITAL"].values()):
        out += ["", "**Does VITAL's text window state each move?** (evaluate.py --text-window at K = the item's "
                "moves: the share of test items whose decoded step k states move k's finding and cell, for every "
                "k; pipeline/text_window.py)", "", "| moves | every move stated (%) | per seed |", "|---|---:|---|"]
        out += [f"| {label(c)} | {fmt(get('VITAL', f'window {c}'))} | "
                + " / ".join(f"{v:.1f}" for v in get("VITAL", f"window {c}")) + " |" for c in cols]
    if "VITAL" in res and all("pointing best" in r for r in res["VITAL"].values()):
        ks = sorted({int(k.split()[-1]) for r in res["VITAL"].values() for k in r
                     if str(k).startswith("pointing step")})
        out += ["", "**Does VITAL's visual window point at the lesion step k reads?** (evaluate.py --pointing --k "
                "sample: the share of test items with a step k whose heatmap cos(VP(h_k), patch) peaks on that "
                "lesion, dilated by one patch; chance: the share of patches that count; ceiling: the ROI target's "
                "own heatmap, the L_vis target)", "",
                "| | " + " | ".join(f"step {k}" for k in ks) + " | best step | chance | ceiling |",
                "|---|" + "---:|" * (len(ks) + 3),
                "| hit rate (%) | " + " | ".join(fmt(get("VITAL", f"pointing step {k}")) for k in ks) + " | "
                + fmt(get("VITAL", "pointing best")) + f" | {statistics.mean(get('VITAL', 'pointing chance')):.1f} | "
                + (fmt(get("VITAL", "pointing ceiling")) if all("pointing ceiling" in r for r in res["VITAL"].values())
                   else "n/a") + " |"]
        out.append("Best step's hit rate per seed: " + " / ".join(f"{v:.1f}" for v in get("VITAL", "pointing best"))
                   + "." + pointing_bound(args))
    out += probe_tables(res, get, cols, label) + memory_table(res, get, lookup or {}, args)
    return "\n".join(out) + "\n"


def pointing_bound(args):
    """-> a sentence: the pointing game of a projector that knows which lesion step k reads and nothing else about
    the image (demo/pointing_bound.py's oracle), and of the ROI targets themselves, per step ('' without the file)."""
    path = os.path.join(data_dir(args) if getattr(args, "out", None) else "data", "pointing_bound.json")
    if not os.path.isfile(path):
        return ""
    pb = json.load(open(path))
    per = lambda key: " / ".join(f"{v[key]:.1f}" for v in pb["by_step"].values())
    return (f" A projector that knows which lesion step k reads (its cell and look: the train steps' mean target) and "
            f"nothing else about the image scores {per('oracle')}% at steps 1-{len(pb['by_step'])}, the per-step ROI "
            f"targets themselves {per('ceiling')}% (demo/pointing_bound.py, {pb['n_steps']} test steps).")


def memory_table(res, get, lookup, args):
    """Each arm's accuracy on the DEEP+ move test items whose pattern a train item has, and on the rest, beside
    the lookup table's (memory_groups)."""
    arms = [a for a in ARMS if a in res and all("memory unseen" in r for r in res[a].values())]
    if not arms or set(lookup) != {"seen", "unseen"}:
        return []
    n = {g: lookup[g][1] for g in lookup}
    out = ["", f"**Walked or recalled?** ({DEEP}-{args.moves} moves: the test items whose findings (a walk's nine and "
           "its moves; an order item's lesions read) occur among the train items, whose end a lookup table recalls "
           "with no walk, and the rest)", "",
           f"| arm | pattern seen in train ({n['seen']} items) | unseen ({n['unseen']} items) | seen - unseen |",
           "|---|---:|---:|---:|"]
    for a in arms:
        seen, unseen = get(a, "memory seen"), get(a, "memory unseen")
        out.append(f"| {a} | {fmt(seen)} | {fmt(unseen)} | {statistics.mean(seen) - statistics.mean(unseen):+.1f} |")
    pct = {g: 100 * c / m for g, (c, m) in lookup.items()}
    out.append(f"| lookup table (the train items' end, else their most common end) | {pct['seen']:.1f} | "
               f"{pct['unseen']:.1f} | {pct['seen'] - pct['unseen']:+.1f} |")
    return out


def probe_tables(res, get, cols, label):
    """The ridge probes of demo/diagnose.py --walk (state_probes), mean ± std over seeds."""
    out, ends = [], [c for c in cols if c != "all"]
    if "K=0" in res and all("end h0 1" in r for r in res["K=0"].values()):
        out += ["", "**Does one pass hold the answer?** (demo/diagnose.py --walk: a ridge probe per move count "
                "reads the end cell from the K = 0 model's h_0, the state it answers from; beside it the same probe "
                "on the nine true brightness bits, which reads what a linear map of the findings gives with no "
                "hop computed, and the most common end cell)", "",
                "| moves | K = 0 model's h_0 | the nine brightness bits | majority |", "|---|---:|---:|---:|"]
        out += [f"| {label(c)} | {fmt(get('K=0', f'end h0 {c}'))} | {statistics.mean(get('K=0', f'end bits {c}')):.1f}"
                f" | {statistics.mean(get('K=0', f'end majority {c}')):.1f} |" for c in ends]
        out.append(f"The findings from the same h_0 (each lesion darker or brighter, mean of the nine cells): "
                   f"{fmt(get('K=0', 'brightness h0'))}%.")
    if "VITAL" in res and all("move 1 h1" in r for r in res["VITAL"].values()):
        js = sorted({int(k.split()[1]) for r in res["VITAL"].values() for k in r if str(k).startswith("move ")})
        out += ["", "**Does latent step j hold move j?** (demo/diagnose.py --walk on VITAL, run to K = the longest "
                "walk: a ridge probe reads the cell after move j, over the items of j or more moves, from h_0 and "
                "from h_j; beside them the nine true brightness bits)", "",
                "| move j | from h_0 | from h_j | the nine brightness bits | majority |", "|---|---:|---:|---:|---:|"]
        out += [f"| {j} | {fmt(get('VITAL', f'move {j} h0'))} | {fmt(get('VITAL', f'move {j} h{j}'))} | "
                f"{statistics.mean(get('VITAL', f'move {j} bits')):.1f} | "
                f"{statistics.mean(get('VITAL', f'move {j} majority')):.1f} |" for j in js]
    return out


def cell_of(col, row):
    """The grid cell (column, row: 0-2, clamped) as the phantom's questions name it."""
    return cell_name((int(min(max(row, 0), 2)), int(min(max(col, 0), 2))))


def against_record(mine, record, seed):
    """mine: {'VITAL' | 'K=0': {this script's figures}} of one seed; record: this script's record JSON of the same
    command over several seeds. -> markdown rows: each figure against the record's mean ± std and range."""
    runs = {arm: [r for _, r in sorted(v.items(), key=lambda kv: int(kv[0]))] for arm, v in record["runs"].items()}
    runs["margin"] = [{"multi": v["multi"] - k["multi"]} for v, k in zip(runs["VITAL"], runs["K=0"])]
    mine = dict(mine, margin={"multi": mine["VITAL"]["multi"] - mine["K=0"]["multi"]})
    rows = [f"**The order question** (one pass per lesion; `python demo/walk.py --demo`: {' '.join(DEMO[:DEMO.index('--seeds')])}): "
            f"seed {seed} here against the {len(runs['VITAL'])} seeds of the record "
            f"({os.path.relpath(DEMO_RECORD, ROOT)}, {record['machine']})", "",
            "| figure (%) | this run | record: mean ± std | record: min - max | inside the record's range |",
            "|---|---:|---:|---:|---|"]
    for arm, key, what in (("VITAL", "multi", "VITAL, accuracy on 2-4 lesions"),
                           ("K=0", "multi", "K = 0 model, accuracy on 2-4 lesions"),
                           ("margin", "multi", "VITAL minus the K = 0 model, 2-4 lesions"),
                           ("VITAL", "window multi", "VITAL's text window: every step stated, 2-4 lesions"),
                           *[("VITAL", f"pointing step {k}", f"VITAL's pointing game, step {k}") for k in range(1, 5)]):
        rec, x = [r[key] for r in runs[arm] if key in r], mine[arm].get(key)
        if rec and x is not None:
            rows.append(f"| {what} | {x:.1f} | {fmt(rec)} | {min(rec):.1f} - {max(rec):.1f} | "
                        f"{'yes' if min(rec) <= x <= max(rec) else 'no'} |")
    return rows


def explain_item(args, samples=None, env=None):
    """--demo: explain.py with the first seed's VITAL on the first test item of --moves lesions, unless done.
    -> (that item, the explanation's path without .json/.png)."""
    if samples is None:
        samples = [json.loads(l) for l in open(os.path.join(data_dir(args), "samples.jsonl")) if l.strip()]
    pick = next(s for s in samples if s["split"] == "test" and moves(s) == args.moves)
    img = pick["image"] if os.path.isabs(pick["image"]) else os.path.join(data_dir(args), pick["image"])
    stem = os.path.join(args.out, "explain", pick["id"])
    if not os.path.isfile(stem + ".json"):
        sh([PY, "explain.py", img, pick["question"], "--ckpt", last_phase(args, "VITAL", args.seeds[0]), "--k",
            str(moves(pick)), "--out", stem], env or dict(os.environ), os.path.join(args.out, "explain.log"))
    return pick, stem


def demo_report(args, res, samples):
    """--demo: the figures of the first seed against the record, and explain.py on the first test item of --moves
    lesions with that seed's VITAL: each step's sentence and where its heatmap peaks, beside the lesion the step
    reads. -> OUT/demo.md's text (the table, then the explanation in a code block)."""
    seed = args.seeds[0]
    with open(DEMO_RECORD) as f:
        rows = against_record({arm: res[arm][seed] for arm in ("VITAL", "K=0")}, json.load(f), seed)
    pick, stem = explain_item(args, samples)
    with open(stem + ".json") as f:
        ex = json.load(f)
    side = 96 / 3  # the order grid: a 96-px image, 3 x 3 cells
    lines = [f"explain (the order question, VITAL seed {seed}): {stem}.png", f"  Q: {pick['question']}",
             f"  gold: {pick['answer']}   VITAL: {ex.get('answer')}   (its first number is lm_head(h_K), eq. 2; the "
             "later ones see the latent positions, whose inputs are h_0..h_K-1, not h_K: README, the answer's read-out)"]
    for st, cell in zip(ex.get("steps", []), pick["meta"]["drawn"]["read"]):
        peak = st.get("peak")
        where = cell_of(peak["x"] // side, peak["y"] // side) if peak else "-"
        lines.append(f"  step {st['k']}: {st.get('sentence')}  [heatmap peak: {where} cell; this step reads the "
                     f"{cell} cell]")
    return "\n".join(rows + ["", "```"] + lines + ["```"]) + "\n"


def main(argv=None):
    args = get_args(argv)
    os.chdir(ROOT)
    if why := check_data_size(args) or check_models(args):
        sys.exit(f"demo/walk.py: {why}")
    copy_stand_in(args)
    # one thread per stage and run whatever the machine: the records were trained so, and the thread count changes
    # the weights (30 steps of phase 1 on two threads: all 28 LoRA tensors differ, by up to 5e-8; docs/tuning-log.md)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    t0 = time.time()
    explain = (lambda: explain_item(args, env=env)) if args.demo else None
    done, failed = run_graph(graph(args, env, explain), args.jobs)
    if isinstance(failed.get("perception check"), PerceptionError):
        sys.exit(f"demo/walk.py: {failed['perception check']}")
    for name, e in failed.items():
        what = f"exit {e.returncode}, see the run's commands.log" if isinstance(e, subprocess.CalledProcessError) \
            else f"{type(e).__name__}: {e}"
        print(f"[failed] {name} ({what})", flush=True)
    if stuck := [n for n, *_ in named_stages(args) if n in failed]:
        sys.exit(f"demo/walk.py: the stage(s) {', '.join(stuck)} failed; the runs need them (re-running resumes)")
    samples = [json.loads(l) for l in open(os.path.join(data_dir(args), "samples.jsonl")) if l.strip()]
    alone = by_moves(os.path.join(stand_in_alone(args), "predictions.jsonl"), samples)
    group, lookup = memory_groups(samples)
    res, trained = {}, sum(1 for n, v in done.items() if n.startswith("evaluate ") and v)
    asked = [(a, s) for s in args.seeds for a in args.arms]
    for arm, seed in asked:
        if f"evaluate {arm} s{seed}" not in done:
            continue
        ev = eval_dir(args, arm, seed)
        res.setdefault(arm, {})[seed] = by_moves(os.path.join(ev, "predictions.jsonl"), samples)
        res[arm][seed].update(by_memory(os.path.join(ev, "predictions.jsonl"), samples, group))
        if os.path.isfile(os.path.join(ev, "probes.json")):
            probes = json.load(open(os.path.join(ev, "probes.json")))["probes"]
            res[arm][seed].update({f"probe {n}": probes[n]["accuracy"] for n in PROBES})
            res[arm][seed]["p shuffled"] = probes["shuffled"]["p_mcnemar"]
        if os.path.isfile(os.path.join(ev, "pointing.json")):
            res[arm][seed].update(pointing(os.path.join(ev, "pointing.json")))
        if os.path.isfile(os.path.join(ev, "walk_probes.json")):
            res[arm][seed].update(state_probes(os.path.join(ev, "walk_probes.json")))
        if os.path.isfile(os.path.join(ev, "text_window.json")):
            res[arm][seed].update(window_by_moves(os.path.join(ev, "text_window.json"), samples))
    words = ("On the order question the tables' words are the walk's: a move is a lesion read, the end cell the order "
             "reached, the nine brightness bits the nine lesions' sizes and brightnesses.\n\n") if args.task == "order" else ""
    md = words + perception(args) + tables(res, blind(samples), alone, args, lookup)
    where = machine()  # one torch-version subprocess for both files
    with open(os.path.join(args.out, f"results{tag(args)}.md"), "w") as f:
        f.write(md)
    with open(os.path.join(args.out, f"results{tag(args)}.json"), "w") as f:
        runs = {a: {str(s): {str(k): v for k, v in r.items()} for s, r in v.items()} for a, v in res.items()}
        json.dump({"args": vars(args), "machine": where, "runs": runs}, f, indent=2)
    cmd = "python demo/walk.py " + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    name = (args.task if args.moves == 4 else f"{args.task}_{args.moves}_moves") + tag(args)
    if not args.no_record:
        with open(os.path.join(HERE, name + ".json"), "w") as f:  # the record the demo's one seed is read against
            json.dump({"command": cmd.strip(), "date": time.strftime('%Y-%m-%d %H:%M'), "machine": where,
                       "runs": runs}, f, indent=1)
        with open(os.path.join(HERE, name + ".md"), "w") as f:
            title = "The walk's evidence" if args.task == "walk" else "The order question's evidence"
            f.write(f"# {title}\n\nWritten by `{cmd.strip()}` on {time.strftime('%Y-%m-%d %H:%M')} "
                    f"({where}); {trained} of {len(asked)} runs trained in this call, "
                    f"{(time.time() - t0) / 60:.1f} min (the others were on disk). Per-run numbers: "
                    f"{args.out}/results{tag(args)}.json.\n\n" + md)
    print("\n" + md)
    if args.demo:
        if missing := [a for a in ("VITAL", "K=0") if args.seeds[0] not in res.get(a, {})]:
            sys.exit(f"demo/walk.py: no evaluation of {' and '.join(missing)} seed {args.seeds[0]} (the [failed] "
                     "lines above say why; re-running resumes)")
        text = demo_report(args, res, samples)
        with open(os.path.join(args.out, "demo.md"), "w") as f:
            f.write(text)
        print(text)


if __name__ == "__main__":
    main()
