"""
VITAL end to end on phantom data with tiny models, on a CPU: what `bash demo.sh` runs.

By default the demo is stage 7 alone, the order question: a phantom question that needs one pass per lesion, where
VITAL's loop beats its K = 0 model (about 9.5 min on 2 cores). --six-types runs stages 1-6 first, the embedded
default's six question types, which one pass answers (README, Results; about 6 more minutes).

Every stage is a subprocess with its documented command line, printed before it runs, so the demo is
also the recipe. A stage whose output already exists is skipped, so re-running resumes. Stages 1-3 and the
copy of the shipped stand-ins are the embedded default's commands (embedded/default.py, which train.py with
no --data runs too). Stages joined by "||" run side by side with one thread each (their output goes to a .log
file next to their folder):
  1. python embedded/tiny.py OUT/models                              -> OUT/models/{backbone,decoder,encoder}
  2. python prepare_data.py --source phantom --out OUT/data ...   -> OUT/data/samples.jsonl, images/, masks/
  P. the stand-in pretrainings (Qwen3-VL and MedSigLIP arrive pretrained; the random tiny ones cannot see).
     The repository ships the two results in embedded/pretrained/ (with the settings, commands and sha256 that
     made them, stand_ins.json); a run with those settings copies them and skips P (8 of its 15 minutes on
     2 cores). --rebuild-stand-ins, or other settings, run P:
     python prepare_data.py --seed 1 --captions ... and --questions-per-image 2 --types (not the grading
     rule) ...                                                       -> OUT/pretrain_data
     python demo/pretrain.py ...                     -> OUT/pretrain/phase1/backbone  (the whole backbone, K = 0)
     || python demo/pretrain_encoder.py ...          -> OUT/encoder_pretrained  (SigLIP's sigmoid loss on the
        captions)
  3. python extract_roi.py ...                                     -> OUT/data/roi.safetensors, then
  4. python train.py ... --phase 1, 2, 3 (VITAL on the frozen pretrained backbone)  -> OUT/vital/phase{1,2,3}
     || python train.py ... --max-k 0 --phase 1, 2, 3 (direct answer, same samples x epochs; beside 3 and 4)
                                                                                      -> OUT/k0/phase{1,2,3}
  5. python evaluate.py ... --k 4 --collapse --probe --pointing (VITAL)               -> OUT/eval_vital
     || python evaluate.py ... --k 0 (the K = 0 model; the pretrained backbone alone, no LoRA)
                                                                    -> OUT/eval_k0, OUT/eval_backbone
  6. python explain.py IMG "question" --ckpt OUT/vital/phase3        -> OUT/explain/<id>.{png,json}
  7. the order question, a phantom question that needs one pass per lesion (the six types above do not: README,
     Results): python demo/walk.py --demo --out OUT/order --seeds SEED (VITAL and the K = 0 model with the command
     of the order record, one seed, on the shipped order stand-in; read against the record's five seeds; explain.py
     on one test item of 4 lesions; about 9.5 min on 2 cores; with --six-types, --skip-order leaves it out)
                                                      -> OUT/order/ (runs, demo.md, explain/<id>.{png,json})
then a summary. Stage 7: its figures beside the five seeds of its record
(demo/order_stepwise_sem10_vis5_positional_words.json) and the explained item. Stages 1-6: closed-ended accuracy of
VITAL, of the K = 0 model, of the backbone alone and chance, overall and per question type, the probes ("do the
latents matter?") and the pointing game; their spread over training seeds comes from
`python demo/ablate.py --suite evidence` (demo/evidence.md). The summary also goes to OUT/summary.md (and
OUT/summary.json with --six-types) and, with the command and date, demo/results.md (demo/results_six_types.md with
--six-types).

    python demo/run.py                       # the order question (README)
    python demo/run.py --six-types           # the six question types first, then the order question
    python demo/run.py --six-types --skip-order --out runs/demo2 --n 1500 --epochs 2 2 4   # other budgets
    python demo/run.py --six-types --skip-order --out runs/demo_random --encoder random    # L_vis, random encoder
    python demo/run.py --six-types --out runs/fresh --rebuild-stand-ins --ship  # remake the shipped stand-ins
"""
import argparse
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
PY = sys.executable
sys.path.insert(0, ROOT)  # for the embedded default's commands and evaluate's table formatting in the summary
from embedded.default import (SETTINGS, SHIPPED, STAND_INS, copy_files, copy_shipped, make_data,  # noqa: E402
                              phase_finished, roi_features, run, sha256, stand_in_done, stand_ins_needed)


def get_args(argv=None):
    ap = argparse.ArgumentParser(description="VITAL demo: the whole pipeline on phantom data "
                                             "with tiny models")
    ap.add_argument("--out", default="runs/demo", help="everything goes under this folder")
    ap.add_argument("--n", type=int, help="phantom images (one question each)")
    ap.add_argument("--image-size", type=int, help="phantom side in px (96 = a 3x3 grid of merged tokens)")
    ap.add_argument("--data-seed", type=int, help="phantom seed")
    ap.add_argument("--hidden", type=int, help="tiny LLM hidden size")
    ap.add_argument("--layers", type=int, help="tiny LLM layers")
    ap.add_argument("--lora-r", type=int, default=64, help="LoRA rank")
    ap.add_argument("--lora-alpha", type=int, default=128, help="LoRA alpha")
    ap.add_argument("--lr", type=float, default=3e-3, help="peak learning rate")
    ap.add_argument("--epochs", type=float, nargs=3, default=[4, 2, 3], metavar=("P1", "P2", "P3"),
                    help="epochs of the three curriculum phases (the K = 0 model gets the same)")
    ap.add_argument("--seed", type=int, default=0, help="training seed")
    ap.add_argument("--pretrain-n", type=int,
                    help="phantom images of the backbone's pretraining corpus "
                         "(another seed: no image is shared)")
    ap.add_argument("--pretrain-epochs", type=float,
                    help="epochs of the backbone pretraining (0 = none: "
                         "VITAL then trains on the random backbone, which does not learn to see)")
    ap.add_argument("--pretrain-lr", type=float, help="peak learning rate of the backbone pretraining")
    ap.add_argument("--encoder", choices=["pretrained", "random"],
                    help="the ROI encoder behind L_vis: the tiny SigLIP after its stand-in pretraining "
                         "(demo/pretrain_encoder.py), or the random one (the comparison row)")
    ap.add_argument("--encoder-epochs", type=int, help="epochs of the encoder pretraining")
    ap.add_argument("--pretrain-seed", type=int,
                    help="seed of both stand-in pretrainings (not --seed: like Qwen3-VL and MedSigLIP, the "
                         "stand-ins arrive pretrained, the same for every training seed)")
    ap.add_argument("--rebuild-stand-ins", action="store_true",
                    help="train the two stand-ins here (about 8 more minutes on 2 cores) instead of copying "
                         "the ones shipped in embedded/pretrained/; a run whose settings differ from theirs "
                         "(embedded/pretrained/stand_ins.json) rebuilds them anyway")
    ap.add_argument("--ship", action="store_true",
                    help="after the run, copy this run's stand-ins and their manifest into embedded/pretrained/ "
                         "(what a maintainer does after changing how they are made)")
    ap.add_argument("--tau", type=float,
                    help="extract_roi.py --tau (mask/image area share below which the ROI is cropped and "
                         "re-encoded; 0 = always the full image)")
    ap.add_argument("--eval-limit", type=int, default=0, help="only the first N test items (0 = all)")
    ap.add_argument("--skip-k0", action="store_true", help="do not train/evaluate the K = 0 model")
    ap.add_argument("--six-types", action="store_true",
                    help="also run the six question types first (stages 1-6: about 6 more minutes on 2 cores; "
                         "VITAL does not beat its K = 0 model on them, README); without it the demo is stage 7 only")
    ap.add_argument("--skip-order", action="store_true",
                    help="with --six-types: skip the order question (one seed of VITAL and the K = 0 model on a "
                         "question that needs several passes, against the record's five seeds)")
    # the defaults of the settings that shape the models, data, stand-ins and ROI features: the embedded
    # default's (embedded/default.py SETTINGS; its tau comment says why 0)
    ap.set_defaults(**SETTINGS)
    args = ap.parse_args(argv)
    # the order question (stage 7) takes --out and --seed only: any other setting shapes stages 1-6
    defaults = vars(ap.parse_args([]))
    six_only = ["--" + k.replace("_", "-") for k, v in vars(args).items()
                if k not in ("out", "seed", "six_types") and v != defaults[k]]
    if six_only and not args.six_types:
        ap.error(f"{', '.join(six_only)}: settings of the six question types (stages 1-6), which run with --six-types "
                 "only; the order question takes --out and --seed (its own settings: python demo/walk.py -h)")
    if args.ship and not args.rebuild_stand_ins:
        ap.error("--ship replaces the shipped stand-ins with this run's: pass --rebuild-stand-ins (and a fresh "
                 "--out) so that this run trains them")
    return args


def side_by_side(*lanes):
    """Run the lanes (callables) at the same time, one thread each: the tiny models are too small to use two
    cores in one process, so two one-thread processes take about the time of one (measured on 2 cores)."""
    with ThreadPoolExecutor(len(lanes)) as pool:
        for f in [pool.submit(lane) for lane in lanes]:
            f.result()  # a failed stage raises here, after the other lane has finished


def train_phases(args, models, data, run_dir, extra, label, timings):
    """The three curriculum phases of one model, in order (a lane of side_by_side)."""
    log = os.path.join(run_dir, "train.log")
    extra = extra + (["--backbone", args.backbone] if args.backbone else [])
    for p in (1, 2, 3):
        phase_dir = os.path.join(run_dir, f"phase{p}")
        cmd = [PY, "train.py", "--data", data, "--preset", "tiny", "--models", models, "--out", run_dir,
               "--phase", str(p), "--epochs", f"{args.epochs[p - 1]:g}", "--lora-r", str(args.lora_r),
               "--lora-alpha", str(args.lora_alpha), "--lr", f"{args.lr:g}", "--seed", str(args.seed)] + extra
        if phase_finished(phase_dir):
            run(cmd, skip_if=phase_dir, what=f"{label} phase {p} (finished)", log=log)
            continue
        if os.path.isdir(phase_dir):  # killed mid-phase: continue from its last checkpoint
            cmd.append("--resume")
        timings[f"{label} phase {p}"] = run(cmd, what=f"{label} phase {p}", log=log)


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def accuracy_by_type(pred_path, samples, field="question_type"):
    """-> {type: (correct, n)} from evaluate.py's predictions.jsonl, typed via samples.jsonl's `field`."""
    qtype = {s["id"]: s.get(field, "?") for s in samples}
    out = defaultdict(lambda: [0, 0])
    for r in read_jsonl(pred_path):
        if r.get("answer_type") != "closed" and "correct" not in r:
            continue
        t = qtype.get(r["id"], "?")
        for key in (t, "all"):
            out[key][0] += int(bool(r.get("correct")))
            out[key][1] += 1
    return dict(out)


def chance_by_type(samples, limit=0):
    test = [s for s in samples if s["split"] == "test" and s.get("choices")]
    test = test[:limit] if limit else test
    out = defaultdict(list)
    for s in test:
        out[s.get("question_type", "?")].append(1 / len(s["choices"]))
        out["all"].append(1 / len(s["choices"]))
    return {t: 100 * sum(v) / len(v) for t, v in out.items()}


def recipe(args, paths):
    """The commands that make the stand-ins: the pretraining corpus (two prepare_data.py calls: a target-free
    caption and two of the five perception question types per image, not the grading rule, on phantom
    images of another seed), the backbone's pretraining and the encoder's."""
    common = [PY, "prepare_data.py", "--source", "phantom", "--out", paths["pretrain_data"], "--n",
              str(args.pretrain_n), "--seed", str(args.data_seed + 1), "--image-size", str(args.image_size),
              "--test-frac", "0", "--val-frac", "0"]
    perception = ["yesno", "identify", "location_choice", "location", "describe"]
    return dict(
        corpus=[common + ["--captions"], common + ["--questions-per-image", "2", "--types"] + perception],
        pretrain=[PY, "demo/pretrain.py", "--data", paths["pretrain_data"], "--models", paths["models"],
                  "--out", paths["pretrain"], "--epochs", f"{args.pretrain_epochs:g}",
                  "--lr", f"{args.pretrain_lr:g}", "--seed", str(args.pretrain_seed)],
        encoder_pretrained=[PY, "demo/pretrain_encoder.py", "--data", paths["pretrain_data"],
                            "--models", paths["models"], "--out", paths["encoder_pretrained"],
                            "--epochs", str(args.encoder_epochs), "--seed", str(args.pretrain_seed)])


def pretrain_encoder(args, paths, timings):
    """The tiny SigLIP's stand-in for MedSigLIP's pretraining: SiglipModel's sigmoid image-text loss on the
    captions of the pretraining corpus -> the encoder folder extract_roi.py and explain.py use."""
    if args.encoder == "random":
        return
    timings["pretrain encoder"] = run(
        recipe(args, paths)["encoder_pretrained"],
        skip_if=os.path.join(paths["encoder_pretrained"], "pretrain.json"),
        what="pretrain the tiny ROI encoder (SigLIP sigmoid loss on the captions)",
        log=paths["encoder_pretrained"] + ".log")


def pretrain_corpus(args, paths, timings):
    """The corpus of both stand-in pretrainings (recipe), only when a stand-in is still to be made."""
    if all(stand_in_done(name, paths) for name in stand_ins_needed(args)):
        return
    for cmd, done, what in zip(recipe(args, paths)["corpus"], ("captions.done", "questions.done"),
                               ("one caption per image", "two question types per image (not the grading rule)")):
        timings["pretrain data"] = timings.get("pretrain data", 0.0) + run(
            cmd, skip_if=os.path.join(paths["pretrain_data"], done), what=f"pretraining corpus: {what}")
        open(os.path.join(paths["pretrain_data"], done), "w").close()


def pretrain(args, paths, timings):
    """The backbone's stand-in pretraining: the corpus answered directly (K = 0) by the whole backbone;
    VITAL then freezes it as the paper freezes Qwen3-VL. -> the backbone folder, or None with
    --pretrain-epochs 0."""
    pre_run = paths["pretrain"]
    if args.pretrain_epochs <= 0:
        return None
    backbone = os.path.join(pre_run, "phase1", "backbone")
    cmd = recipe(args, paths)["pretrain"]
    if stand_in_done("pretrain", paths):
        run(cmd, skip_if=backbone, what="pretrain the tiny backbone (finished)")
    else:
        timings["pretrain"] = run(cmd + (["--resume"] if os.path.isdir(os.path.join(pre_run, "phase1"))
                                         else []),
                                  what="pretrain the tiny backbone (whole model, K = 0)", log=pre_run + ".log")
    return backbone


# --ship: this run's stand-ins replace the shipped ones (embedded/default.py copies them into a run folder).
NOT_SHIPPED = ("log.jsonl",)  # the per-step log of the backbone pretraining (1.9 MB); loss.png shows it


def stand_in_manifest(args, paths, timings):
    """The manifest of the stand-ins this run holds: their settings, files (sha256), command and time."""
    seconds = {"pretrain": timings.get("pretrain"), "encoder_pretrained": timings.get("pretrain encoder")}
    cmds = recipe(args, paths)
    line = lambda cmd: " ".join(["python"] + [shlex.quote(c) for c in cmd[1:]])
    out = dict(made_on=f"{time.strftime('%Y-%m-%d')}, {machine()}")
    for name in stand_ins_needed(args):
        root = paths[name]
        files = sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs
                       if f not in NOT_SHIPPED)
        out[name] = dict(args={k: getattr(args, k) for k in STAND_INS[name]},
                         commands=[line(c) for c in cmds["corpus"] + [cmds[name]]], seconds=seconds[name],
                         files={rel: sha256(os.path.join(root, rel)) for rel in files})
    return out


def ship(args, paths, timings, shipped=SHIPPED):
    """--ship: this run's stand-ins and their manifest entries replace those in embedded/pretrained/; the entries
    another script ships (demo/walk.py's order_pretrain) are kept."""
    manifest = stand_in_manifest(args, paths, timings)
    if any(manifest[n]["seconds"] is None for n in stand_ins_needed(args)):
        sys.exit("run.py: error: --ship needs stand-ins trained by this run: pass --rebuild-stand-ins "
                 "with a fresh --out")
    old = os.path.join(shipped, "stand_ins.json")
    if os.path.isfile(old):
        with open(old) as f:
            manifest = {**{k: v for k, v in json.load(f).items() if k not in STAND_INS}, **manifest}
    for name in stand_ins_needed(args):
        shutil.rmtree(os.path.join(shipped, name), ignore_errors=True)
        copy_files(paths[name], os.path.join(shipped, name), manifest[name]["files"])
    with open(os.path.join(shipped, "stand_ins.json"), "w") as f:
        json.dump(manifest, f, indent=1)
    print(f"[ship] the stand-ins of {paths['out']} are now {shipped} (commit them)")


def evaluate_all(args, paths, timings):
    """Two lanes: VITAL at K = 4 with the probes, the pointing game and the collapse analysis; then the K = 0
    model and the pretrained backbone alone (no LoRA: the tiny counterpart of the zero-shot row)."""
    lim = ["--limit", str(args.eval_limit)] if args.eval_limit else []

    def evaluate(name, ckpt, out_key, flags, what, log):
        timings[name] = run([PY, "evaluate.py", "--ckpt", ckpt, "--data", paths["data"], "--out", paths[out_key]]
                            + flags + lim, skip_if=os.path.join(paths[out_key], "metrics.json"), what=what,
                            log=log)

    def vital_lane():
        evaluate("eval VITAL", os.path.join(paths["vital"], "phase3"), "eval_vital",
                 ["--k", "4", "--collapse", "--probe", "--pointing"],
                 "evaluate VITAL (K = 4) with the probes and the pointing game",
                 os.path.join(paths["eval_vital"] + ".log"))

    def baselines_lane():
        log = os.path.join(paths["out"], "eval_baselines.log")
        if not args.skip_k0:
            evaluate("eval K=0", os.path.join(paths["k0"], "phase3"), "eval_k0", ["--k", "0"],
                     "evaluate the K = 0 model", log)
        if args.backbone:
            evaluate("eval backbone", os.path.join(paths["pretrain"], "phase1"), "eval_backbone", ["--k", "0"],
                     "evaluate the pretrained backbone alone (no LoRA)", log)
    side_by_side(vital_lane, baselines_lane)


def explain_one(samples, paths, timings):
    """One test image with a multi-step question (describe/reasoning) if there is one: more steps to read."""
    test = [s for s in samples if s["split"] == "test"]
    pick = next((s for s in test if s.get("latent_steps", 1) >= 3), test[0])
    img = pick["image"] if os.path.isabs(pick["image"]) else os.path.join(paths["data"], pick["image"])
    stem = os.path.join(paths["out"], "explain", pick["id"])
    timings["explain"] = run([PY, "explain.py", img, pick["question"], "--ckpt",
                              os.path.join(paths["vital"], "phase3"), "--out", stem],
                             skip_if=stem + ".json", what="explain one test image")
    with open(stem + ".json") as f:
        return pick, stem, json.load(f)


def order_question(args, paths, timings):
    """Stage 7: `demo/walk.py --demo` (the order question, one seed, read against its record; walk.py resumes).
    -> (its markdown rows for the summary, the explanation's lines for the report), from OUT/order/demo.md."""
    timings["order question"] = run([PY, "demo/walk.py", "--demo", "--out", paths["order"], "--seeds", str(args.seed)],
                                    what=f"the order question: VITAL and the K = 0 model, seed {args.seed} "
                                         "(about 9.5 min on 2 cores)")
    with open(os.path.join(paths["order"], "demo.md")) as f:
        text = f.read().rstrip("\n").split("\n")
    cut = text.index("```") if "```" in text else len(text)  # the table, then the explanation in a code block
    return [""] + text[:cut], [line for line in text[cut:] if line != "```"]


def summary_table(args, samples, paths):
    """-> (markdown rows, {type: accuracies}) of closed-ended accuracy per question type."""
    chance = chance_by_type(samples, args.eval_limit)
    acc = {k: accuracy_by_type(os.path.join(paths[p], "predictions.jsonl"), samples) if use else {}
           for k, p, use in (("vital", "eval_vital", True), ("k0", "eval_k0", not args.skip_k0),
                             ("bb", "eval_backbone", bool(args.backbone)))}
    types = ["all"] + sorted(t for t in acc["vital"] if t != "all")
    pct = lambda a, t: (100 * a[t][0] / a[t][1]) if t in a and a[t][1] else float("nan")
    rows = ["| question type | n | VITAL (K=4) | K=0 model | backbone alone | chance |",
            "|---|---:|---:|---:|---:|---:|"]
    table = {}
    for t in types:
        table[t] = dict(n=acc["vital"][t][1], vital=pct(acc["vital"], t), k0=pct(acc["k0"], t),
                        backbone_alone=pct(acc["bb"], t), chance=chance.get(t))
        rows.append(f"| {t} | {table[t]['n']} | {table[t]['vital']:.1f} | {table[t]['k0']:.1f} | "
                    f"{table[t]['backbone_alone']:.1f} | {chance.get(t, float('nan')):.1f} |")
    return rows, table


def probe_rows(paths):
    """The probe table and the pointing game of the VITAL evaluation (evaluate.py --probe --pointing), as
    markdown lines under the accuracy table."""
    import evaluate  # the repository root is on sys.path when this file runs as a script
    out = []
    for name, title, fmt in (("probes.json", "Do the latents matter? (VITAL, K = 4, same items)",
                              evaluate.probe_table),
                             ("pointing.json", "Pointing game of the visual window (VITAL, K = 4)",
                              evaluate.pointing_table)):
        path = os.path.join(paths["eval_vital"], name)
        if os.path.isfile(path):
            with open(path) as f:
                out += ["", f"**{title}**", "", fmt(json.load(f)).rstrip("\n")]
    return out


def write_results(args, argv, rows, wall, timings, shipped, what=None):
    """demo/results.md (demo/results_six_types.md with --six-types): the table with the command, date and machine
    that produced it (rewritten each run); `what` replaces the six types' heading line (the order question alone)."""
    cmd = "python demo/run.py " + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    with open(results_file(args), "w") as f:
        f.write(f"# Demo results\n\nWritten by `{cmd.strip()}` on {time.strftime('%Y-%m-%d %H:%M')} "
                f"({machine()}); wall time "
                f"{wall / 60:.1f} min" + (f" (stand-ins copied from embedded/pretrained/: {', '.join(shipped)})"
                                         if shipped else "") +
                (f". {what}, training seed {args.seed}:\n\n" if what else
                 f". Closed-ended accuracy (%) on the phantom test split, training seed {args.seed}:\n\n")
                + "\n".join(rows) + "\n\nStages (s): " +
                ", ".join(f"{k} {v:.0f}" for k, v in timings.items() if v) + "\n")


def results_file(args):
    """Where write_results writes: the default demo's and the six types' results are two files."""
    return os.path.join(HERE, "results_six_types.md" if args.six_types else "results.md")


def torch_version():
    out = subprocess.run([PY, "-c", "import torch; print(torch.__version__)"], capture_output=True, text=True)
    return out.stdout.strip()


def machine(cpuinfo="/proc/cpuinfo"):
    """The machine a figure came from, as the results files name it: 'AMD EPYC (family 25, model 17, avx512f),
    x86_64, 2 cores, torch 2.13.0+cpu'. CPU training is reproducible to the bit on one CPU model and not across
    models, so a figure names its CPU model, not only its core count. Without /proc/cpuinfo: platform's words."""
    info = {}
    if os.path.isfile(cpuinfo):
        with open(cpuinfo) as f:
            for line in f:
                key, _, val = line.partition(":")
                info.setdefault(key.strip(), val.strip())  # the first processor's lines
    flags = info.get("flags", info.get("Features", "")).split()  # x86 / arm
    vec = next((v for v in ("avx512f", "avx2", "asimd") if v in flags), None)  # the widest vector unit
    cpu = info.get("model name") or platform.processor() or "unknown CPU"
    detail = ", ".join(x for x in (f"family {info['cpu family']}" if "cpu family" in info else None,
                                   f"model {info['model']}" if "model" in info else None, vec) if x)
    return (f"{cpu}{f' ({detail})' if detail else ''}, {platform.machine()}, {os.cpu_count()} cores, "
            f"torch {torch_version()}")


def print_report(paths, args, pick, stem, ex, rows, wall, timings, shipped, order_lines=()):
    print("\n================ VITAL demo: artifacts ================")
    for name, path in [("tiny models", paths["models"]), ("pretraining corpus", paths["pretrain_data"]),
                       ("pretrained backbone", args.backbone or "-"),
                       ("backbone-alone evaluation", paths["eval_backbone"]),
                       ("phantom data (samples.jsonl, images/, masks/, overlays/, stats.json)",
                        paths["data"]),
                       ("ROI features", os.path.join(paths["data"], "roi.safetensors")),
                       ("VITAL checkpoints + log.jsonl", paths["vital"]), ("K = 0 checkpoints", paths["k0"]),
                       *[(f"loss curves ({k})", os.path.join(paths[k], "loss.png")) for k in ("vital", "k0")],
                       ("VITAL evaluation (predictions, metrics, collapse, probes, pointing game)",
                        paths["eval_vital"]),
                       ("ROI encoder (pretrained stand-in for MedSigLIP, or the random one)", paths["encoder"]),
                       ("K = 0 evaluation", paths["eval_k0"]), ("explanation (panel + JSON)", stem + ".png"),
                       *([("the order question (data, stand-in, runs, results_*.md, explain/)", paths["order"])]
                         if not args.skip_order else []),
                       ("summary", os.path.join(paths["out"], "summary.md")),
                       ("results (command, date, table)", os.path.relpath(results_file(args), ROOT))]:
        print(f"  {name:<70} {path}")
    print(f"\nexplain: Q: {pick['question']}\n         gold: {pick['answer']}")
    print(f"         VITAL: {ex.get('answer')}")
    for st in ex.get("steps", []):
        peak = st.get("peak")
        where = f"  [heatmap peak x={peak['x']:.0f}, y={peak['y']:.0f}]" if peak else ""
        print(f"         step {st['k']}: {st.get('sentence')}{where}")
    if order_lines:
        print("\n" + "\n".join(order_lines))
    print("\n================ closed-ended accuracy on the phantom test split (%) ================")
    print("\n".join(rows))
    print(f"\nwall time of this run: {wall / 60:.1f} min (stages: " +
          ", ".join(f"{k} {v:.0f}s" for k, v in timings.items() if v) + ")")
    if shipped:
        print(f"stand-ins copied from {SHIPPED}: {', '.join(shipped)} "
              "(--rebuild-stand-ins trains them here: about 8 more minutes)")


def main(argv=None):
    args = get_args(argv)
    os.chdir(ROOT)  # the stage commands are run, and printed, from the repository root
    t_start, timings, out = time.time(), {}, args.out
    paths = {k: os.path.join(out, k) for k in ("models", "data", "pretrain_data", "pretrain", "vital", "k0",
                                               "eval_vital", "eval_k0",
                                               "eval_backbone", "order")}
    paths["out"], paths["encoder_pretrained"] = out, os.path.join(out, "encoder_pretrained")
    paths["roi"] = os.path.join(paths["data"], "roi.safetensors")
    paths["roi_log"] = os.path.join(out, "roi.log")
    paths["encoder"] = paths["encoder_pretrained"] if args.encoder == "pretrained" else \
        os.path.join(paths["models"], "encoder")
    if not args.six_types:
        return order_only(args, argv, paths, t_start, timings)
    make_data(args, paths, timings)
    shipped = copy_shipped(args, paths)
    pretrain_corpus(args, paths, timings)
    side_by_side(lambda: pretrain(args, paths, timings),                       # the backbone, and beside it
                 lambda: pretrain_encoder(args, paths, timings))               # the ROI encoder
    args.backbone = os.path.join(paths["pretrain"], "phase1", "backbone") if args.pretrain_epochs > 0 else None
    # VITAL needs the ROI features (L_vis), the K = 0 model does not: they are made in VITAL's lane
    lanes = [lambda: (roi_features(args, paths, timings),
                      train_phases(args, paths["models"], paths["data"], paths["vital"], [], "VITAL", timings))]
    if not args.skip_k0:
        lanes.append(lambda: train_phases(args, paths["models"], paths["data"], paths["k0"], ["--max-k", "0"],
                                          "K=0", timings))
    side_by_side(*lanes)
    evaluate_all(args, paths, timings)
    samples = read_jsonl(os.path.join(paths["data"], "samples.jsonl"))
    pick, stem, ex = explain_one(samples, paths, timings)
    rows, table = summary_table(args, samples, paths)
    rows += probe_rows(paths)
    order_rows, order_lines = order_question(args, paths, timings) if not args.skip_order else ([], [])
    rows += order_rows
    wall = time.time() - t_start
    summary = {"wall_s_this_run": round(wall, 1), "stage_s": {k: round(v, 1) for k, v in timings.items()},
               "stand_ins_shipped": shipped, "accuracy": table, "args": vars(args)}
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2, allow_nan=False)
    with open(os.path.join(out, "summary.md"), "w") as f:
        f.write("\n".join(rows) + "\n")
    write_results(args, argv, rows, wall, timings, shipped)
    print_report(paths, args, pick, stem, ex, rows, wall, timings, shipped, order_lines)
    if args.ship:
        ship(args, paths, timings)


def order_only(args, argv, paths, t_start, timings):
    """The demo without --six-types: stage 7 alone (its data, stand-in, runs, evaluations and explanation are
    demo/walk.py --demo's); its table and explanation to the screen, OUT/summary.md and demo/results.md."""
    rows, lines = order_question(args, paths, timings)
    rows = rows[1:]  # without the blank line that separates it from the six types' table
    wall = time.time() - t_start
    with open(os.path.join(paths["out"], "summary.md"), "w") as f:
        f.write("\n".join(rows) + "\n")
    write_results(args, argv, rows, wall, timings, [], "The order question")
    print("\n================ VITAL demo: the order question ================")
    for name, path in (("data, stand-in, runs, evaluations, results_*.md, demo.md, explain/", paths["order"]),
                       ("results (command, date, table)", os.path.relpath(results_file(args), ROOT))):
        print(f"  {name:<70} {path}")
    print("\n" + "\n".join(lines) + "\n\n" + "\n".join(rows))
    print(f"\nwall time of this run: {wall / 60:.1f} min (the six question types too: --six-types, about 6 more "
          "minutes)")


if __name__ == "__main__":
    main()
