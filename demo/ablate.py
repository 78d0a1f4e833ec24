"""
The paper's ablations in miniature (§4.3 Tables 2-3, the curriculum strategies, §C.6 collapse) on the
phantom data with the tiny models, a fixed budget and several training seeds.

Every run is `train.py` (all phases of its curriculum) then `evaluate.py` on the test split, as
subprocesses with their documented command lines; a run whose OUT/<config>/s<seed>/eval/metrics.json
exists is skipped, and a phase killed half-way continues with --resume, so re-running resumes.
  Table 2      task-only (--lambda-sem 0 --lambda-vis 0), +semantic (--lambda-vis 0),
               +visual (--lambda-sem 0), full
  Table 3      K = 0..4 as --max-k (train) and --k (evaluate); K = 4 is the full model
  curriculum   --curriculum 3-phase (= full) / 2-phase / full-mix / reverse, each with the same total epochs
  §C.6         mean off-diagonal inter-step cosine similarity (evaluate --collapse, K = 4), task-only vs full
Budget: the schedule's default epochs (5/5/10, 10/10, 20, 10/5/5: 20 in total for every curriculum) times
--epoch-scale, on at most --limit train samples per phase.
Writes OUT/results.md (the tables, also printed), OUT/results.json (every run's numbers) and
demo/ablations.md (the tables with the command and date that produced them).

--suite evidence runs the demo's own configuration (epochs 4/2/3, every train sample, the demo's
models, data, pretrained backbone and encoder) for each seed: VITAL (evaluated with the probes, the pointing
game and §C.6), VITAL with --depth phase, the K = 0 model, the pause arm (--feedback pause), task-only, and
VITAL with L_vis from the random encoder (a copy of the data with its ROI features); plus the backbone alone
once. -> runs/evidence/,
demo/evidence.md. Seed 0 of VITAL and K = 0 repeats the demo's own runs (bit-identical on one machine).

    python demo/ablate.py                             # the README's budget (reuses runs/demo's models + data:
                                                      # bash demo.sh --six-types makes them)
    python demo/ablate.py --seeds 0 1 2 3 4 --epoch-scale 1 --limit 0 --eval-limit 0   # a bigger budget
    python demo/ablate.py --suite evidence --seeds 0 1 2       # after bash demo.sh --six-types: ~45 min on 2 cores
"""
import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

HERE = os.path.dirname(os.path.abspath(__file__))
# the stage commands run from the repository root
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
from demo.run import accuracy_by_type  # noqa: E402  (the demo's per-type count)
from embedded.default import phase_finished  # noqa: E402
PY = sys.executable
# train.py's CURRICULA
SCHEDULES = {"3-phase": [5, 5, 10], "2-phase": [10, 10], "full-mix": [20], "reverse": [10, 5, 5]}
LOSSES = {"task-only": ["--lambda-sem", "0", "--lambda-vis", "0"], "+semantic": ["--lambda-vis", "0"],
          "+visual": ["--lambda-sem", "0"], "full": []}
_print_lock = threading.Lock()


def get_args(argv=None):
    ap = argparse.ArgumentParser(description="VITAL ablations in miniature (paper §4.3, §C.6)")
    ap.add_argument("--out", help="run folders, results.md, results.json (default runs/ablate, with "
                                  "--suite evidence runs/evidence)")
    ap.add_argument("--models", default="runs/demo/models",
                    help="tiny models (made with demo.py's command if absent)")
    ap.add_argument("--backbone", default="runs/demo/pretrain/phase1/backbone",
                    help="the backbone every run freezes: the demo's pretrained tiny one "
                         "('' = the random one in --models)")
    ap.add_argument("--data", default="runs/demo/data",
                    help="phantom data with roi.safetensors (made if absent)")
    ap.add_argument("--n", type=int, default=3000, help="phantom images, only if --data has to be made")
    ap.add_argument("--image-size", type=int, default=96, help="phantom side, only if --data has to be made")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2],
                    help="training seeds (>= 3 for a spread)")
    ap.add_argument("--epoch-scale", type=float, default=0.2,
                    help="x the schedule's default epochs (20 in total)")
    ap.add_argument("--limit", type=int, default=800, help="train samples per phase (0 = all)")
    ap.add_argument("--lora-r", type=int, default=64)
    ap.add_argument("--lora-alpha", type=int, default=128)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--eval-limit", type=int, default=0, help="test items evaluated (0 = all)")
    ap.add_argument("--jobs", type=int, default=2,
                    help="runs at once (each with OMP_NUM_THREADS = cores / jobs)")
    ap.add_argument("--only", nargs="*", help="config names to run (default all)")
    ap.add_argument("--suite", default="paper", choices=["paper", "evidence"],
                    help="paper: Tables 2-3, curricula, §C.6 at --epoch-scale/--limit; evidence: the demo's own "
                         "configuration over --seeds (VITAL, depth=phase, K = 0, task-only, random encoder) "
                         "with probes and the pointing game")
    ap.add_argument("--data-random", default="runs/demo/data_random",
                    help="evidence: --data's samples with ROI features from the random encoder (made if absent)")
    return ap.parse_args(argv)


# --suite evidence: the demo's own configuration (its epochs, every train sample, its lr) over
# several seeds: is VITAL better than its K = 0 model, do the latents matter, does the heatmap point at the
# target? name -> (extra train args, eval flags, data folder key)
DEMO_EPOCHS = [4, 2, 3]
EVIDENCE = {"VITAL": (["--depth", "phase"], ["--k", "4", "--probe", "--pointing", "--collapse"], "data"),
            "VITAL depth=own": (["--depth", "own"], ["--k", "4", "--probe", "--pointing", "--collapse"], "data"),
            "K=0": (["--max-k", "0"], ["--k", "0"], "data"),
            # the same K and curriculum, a learned constant fed at each step instead of h_{k-1} (Coconut's pause)
            "pause": (["--depth", "phase", "--feedback", "pause"], ["--k", "4", "--collapse"], "data"),
            # the two comparison rows keep --depth own: they are read against "VITAL depth=own"
            "task-only": (LOSSES["task-only"] + ["--depth", "own"], ["--k", "4", "--collapse"], "data"),
            "VITAL random encoder": (["--depth", "own"], ["--k", "4", "--pointing"], "data_random")}


def configs():
    """name -> (extra train args, curriculum, eval K, collapse?)"""
    c = {}
    for name, extra in LOSSES.items():
        c[name] = (extra, "3-phase", 4, name in ("task-only", "full"))
    for k in range(4):  # K = 4 is "full"
        c[f"K={k}"] = (["--max-k", str(k)], "3-phase", k, False)
    for cur in ("2-phase", "full-mix", "reverse"):
        c[cur] = (["--curriculum", cur], cur, 4, False)
    return c


def sh(cmd, env, log_path):
    line = " ".join(shlex.quote(c) for c in cmd)
    with _print_lock:
        print(f"    $ {line}", flush=True)
    with open(log_path, "a") as log:
        log.write(f"$ {line}\n")
        log.flush()
        subprocess.run(cmd, check=True, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)


def one_run(args, name, seed, spec, env):
    extra, cur, k_eval, collapse = spec
    run_dir = os.path.join(args.out, name, f"s{seed}")
    ev = os.path.join(run_dir, "eval")
    if os.path.isfile(os.path.join(ev, "metrics.json")):
        return name, seed, read_result(ev)
    os.makedirs(run_dir, exist_ok=True)
    log = os.path.join(run_dir, "commands.log")
    t0 = time.time()
    for p, ep in enumerate(SCHEDULES[cur], 1):
        phase_dir = os.path.join(run_dir, f"phase{p}")
        if phase_finished(phase_dir):
            continue
        cmd = [PY, "train.py", "--data", args.data, "--preset", "tiny",
               "--models", args.models, "--out", run_dir,
               "--phase", str(p), "--epochs", f"{ep * args.epoch_scale:g}", "--limit", str(args.limit),
               "--lora-r", str(args.lora_r), "--lora-alpha", str(args.lora_alpha), "--lr", f"{args.lr:g}",
               "--seed", str(seed)] + extra + (["--resume"] if os.path.isdir(phase_dir) else []) + \
              (["--backbone", args.backbone] if args.backbone else [])
        sh(cmd, env, log)
    cmd = [PY, "evaluate.py", "--ckpt", os.path.join(run_dir, f"phase{len(SCHEDULES[cur])}"),
           "--data", args.data, "--out", ev, "--k", str(k_eval)] + (["--collapse"] if collapse else []) + \
          (["--limit", str(args.eval_limit)] if args.eval_limit else [])
    sh(cmd, env, log)
    with _print_lock:
        print(f"[done] {name} seed {seed} in {time.time() - t0:.0f}s", flush=True)
    return name, seed, read_result(ev)


def evidence_run(args, name, seed, env):
    """One config of the evidence suite at one seed: the demo's three phases, then evaluate.py."""
    extra, eval_flags, data_key = EVIDENCE[name]
    data = args.data if data_key == "data" else args.data_random
    run_dir = os.path.join(args.out, name.replace(" ", "_").replace("=", ""), f"s{seed}")
    ev = os.path.join(run_dir, "eval")
    if not os.path.isfile(os.path.join(ev, "metrics.json")):
        os.makedirs(run_dir, exist_ok=True)
        log, t0 = os.path.join(run_dir, "commands.log"), time.time()
        for p, ep in enumerate(DEMO_EPOCHS, 1):
            phase_dir = os.path.join(run_dir, f"phase{p}")
            if phase_finished(phase_dir):
                continue
            sh([PY, "train.py", "--data", data, "--preset", "tiny", "--models", args.models, "--out", run_dir,
                "--phase", str(p), "--epochs", f"{ep:g}", "--lora-r", str(args.lora_r),
                "--lora-alpha", str(args.lora_alpha), "--lr", f"{args.lr:g}", "--seed", str(seed),
                "--backbone", args.backbone] + extra + (["--resume"] if os.path.isdir(phase_dir) else []),
               env, log)
        sh([PY, "evaluate.py", "--ckpt", os.path.join(run_dir, "phase3"), "--data", data, "--out", ev]
           + eval_flags, env, log)
        with _print_lock:
            print(f"[done] {name} seed {seed} in {time.time() - t0:.0f}s", flush=True)
    return name, seed, read_result(ev, data)


def by_type(ev, data):
    """Closed-ended accuracy (%) per question type (and 'all'): demo/run.py's count, as percentages."""
    samples = [json.loads(l) for l in open(os.path.join(data, "samples.jsonl")) if l.strip()]
    return {t: 100 * c / n for t, (c, n) in accuracy_by_type(os.path.join(ev, "predictions.jsonl"),
                                                              samples).items()}


def read_result(ev, data=None):
    m = json.load(open(os.path.join(ev, "metrics.json")))
    r = {"acc": next(iter(m["benchmarks"].values()))["closed_acc"]}
    cp = os.path.join(ev, "collapse.json")
    if os.path.isfile(cp):
        r["collapse"] = json.load(open(cp))["mean_offdiag"]
    if data:
        r["by_type"] = by_type(ev, data)
    if "probes" in m:
        r.update({f"probe {k}": v["accuracy"] for k, v in m["probes"]["probes"].items()})
    if "pointing" in m:
        r["pointing best"] = m["pointing"]["best_hit_rate"]
        r["pointing chance"] = m["pointing"]["chance"]
        if m["pointing"].get("ceiling") is not None:
            r["pointing ceiling"] = m["pointing"]["ceiling"]
        r.update({f"pointing step {s['k']}": s["hit_rate"] for s in m["pointing"]["steps"]})
    return r


def fmt(vals, digits=1):
    if not vals:
        return "-"
    m = statistics.mean(vals)
    s = statistics.stdev(vals) if len(vals) > 1 else 0.0
    return f"{m:.{digits}f} ± {s:.{digits}f}"


def chance(data, limit):
    test = [json.loads(l) for l in open(os.path.join(data, "samples.jsonl")) if l.strip()]
    test = [s for s in test if s["split"] == "test" and s.get("choices")]
    test = test[:limit] if limit else test
    return 100 * sum(1 / len(s["choices"]) for s in test) / len(test)


def tables(args, res):
    seeds = ", ".join(map(str, args.seeds))
    get = lambda name, key="acc": [res[name][s][key] for s in sorted(res.get(name, {}))
                                   if key in res[name][s]]
    per_seed = lambda name, key="acc", d=1: " / ".join(f"{v:.{d}f}" for v in get(name, key))
    out = [f"Budget: {args.epoch_scale:g} x the schedule's epochs (20 in total at scale 1), "
           f"at most {args.limit or 'all'} train samples per phase, LoRA r={args.lora_r} "
           f"alpha={args.lora_alpha}, lr {args.lr:g}, training seeds {seeds}; "
           f"closed-ended accuracy (%) on {args.eval_limit or 'all'} phantom test items, "
           f"mean ± sample std over seeds (per-seed values after). "
           f"Chance: {chance(args.data, args.eval_limit):.1f}%.", "",
           "**Table 2 (supervision, K = 4, 3-phase)**", "", "| config | acc | per seed |", "|---|---:|---|"]
    out += [f"| {n} | {fmt(get(n))} | {per_seed(n)} |" for n in LOSSES]
    out += ["", "**Table 3 (latent steps: --max-k K in training, --k K at evaluation)**", "",
            "| K | acc | per seed |", "|---|---:|---|"]
    out += [f"| {k} | {fmt(get(n))} | {per_seed(n)} |"
            for k, n in [(k, f"K={k}") for k in range(4)] + [(4, "full")]]
    out += ["", "**Curriculum (§4.3; same total epochs)**", "",
            "| schedule | acc | per seed |", "|---|---:|---|"]
    out += [f"| {c} | {fmt(get(n))} | {per_seed(n)} |" for c, n in
            [("3-phase", "full"), ("2-phase", "2-phase"), ("full-mix", "full-mix"), ("reverse", "reverse")]]
    out += ["", "**§C.6 inter-step similarity (mean off-diagonal cosine of h_1..h_4; "
                "lower = less collapse)**", "",
            "| config | cosine | per seed |", "|---|---:|---|"]
    out += [f"| {n} | {fmt(get(n, 'collapse'), 3)} | {per_seed(n, 'collapse', 3)} |"
            for n in ("task-only", "full")]
    return "\n".join(out) + "\n"


def evidence_tables(args, res, backbone_alone):
    """The evidence suite's tables: accuracy per config and question type, VITAL - K=0, probes, pointing game,
    collapse; mean ± sample std over seeds."""
    get = lambda name, key: [res[name][s][key] for s in sorted(res.get(name, {})) if key in res[name][s]]
    typ = lambda name, t: [res[name][s]["by_type"][t] for s in sorted(res.get(name, {}))]
    types = ["all", "reasoning"] + sorted({t for v in res.get("VITAL", {}).values() for t in v["by_type"]}
                                          - {"all", "reasoning"})
    seeds = ", ".join(map(str, args.seeds))
    out = [f"The demo's configuration (epochs {'/'.join(map(str, DEMO_EPOCHS))}, every train sample, LoRA "
           f"r={args.lora_r} alpha={args.lora_alpha}, lr {args.lr:g}) on {args.data}, training seeds {seeds}; "
           "closed-ended accuracy (%) on the phantom test split, mean ± sample std over seeds. VITAL = train.py's "
           "default (--depth phase); task-only and the random-encoder row train with --depth own and are read "
           "against 'VITAL depth=own'.", "",
           "| config | " + " | ".join(types) + " | all, per seed |", "|---|" + "---:|" * len(types) + "---|"]
    for name in EVIDENCE:
        if name in res:
            out.append(f"| {name} | " + " | ".join(fmt(typ(name, t)) for t in types) + " | " +
                       " / ".join(f"{v:.1f}" for v in typ(name, "all")) + " |")
    if backbone_alone:
        out.append("| backbone alone (no LoRA, K = 0; one evaluation) | " +
                   " | ".join(f"{backbone_alone.get(t, float('nan')):.1f}" for t in types) + " | |")
    out.append(f"| chance | {chance(args.data, 0):.1f} | | " + "| " * (len(types) - 2) + "|")
    for other, what in (("K=0", "the K = 0 model"), ("pause", "the pause arm (same K, constants fed back)")):
        if "VITAL" not in res or other not in res:
            continue
        out += ["", f"**VITAL (K = 4) minus {what}** (points; pooled std = sqrt((s1² + s2²) / 2))", "",
                "| question type | difference of means | pooled std | per seed |", "|---|---:|---:|---|"]
        for t in types:
            a, b = typ("VITAL", t), typ(other, t)
            sd = lambda v: statistics.stdev(v) if len(v) > 1 else 0.0
            out.append(f"| {t} | {statistics.mean(a) - statistics.mean(b):+.1f} | "
                       f"{((sd(a) ** 2 + sd(b) ** 2) / 2) ** 0.5:.1f} | "
                       + " / ".join(f"{x - y:+.1f}" for x, y in zip(a, b)) + " |")
    for name in [n for n in EVIDENCE if get(n, "probe normal")]:
        out += ["", f"**Do the latents matter?** ({name}, K = 4; evaluate.py --probe)", "",
                "| fed back at each latent step | accuracy | change vs normal | per seed |", "|---|---:|---:|---|"]
        base = get(name, "probe normal")
        out += [f"| {k} | {fmt(get(name, 'probe ' + k))} | "
                f"{statistics.mean(get(name, 'probe ' + k)) - statistics.mean(base):+.1f} | " +
                " / ".join(f"{v:.1f}" for v in get(name, "probe " + k)) + " |"
                for k in ("normal", "zero", "h0", "shuffled")]
    point = [n for n in EVIDENCE if get(n, "pointing best")]
    if point:
        out += ["", "**Pointing game** (share of test items whose heatmap peaks inside the target, dilated by "
                "one patch; evaluate.py --pointing; ceiling: the same game played by the ROI targets "
                "themselves, what a perfect visual projector would score)", "",
                "| config | step 1 | step 2 | step 3 | step 4 | best step | chance | ceiling |",
                "|---|" + "---:|" * 7]
        out += [f"| {n} | " + " | ".join(fmt(get(n, f"pointing step {k}")) for k in range(1, 5)) +
                f" | {fmt(get(n, 'pointing best'))} | {fmt(get(n, 'pointing chance'))} | "
                f"{fmt(get(n, 'pointing ceiling'))} |" for n in point]
    coll = [n for n in EVIDENCE if get(n, "collapse")]
    if coll:
        out += ["", "**§C.6 inter-step cosine of h_1..h_4** (lower = less collapse)", "",
                "| config | cosine | per seed |", "|---|---:|---|"]
        out += [f"| {n} | {fmt(get(n, 'collapse'), 3)} | " +
                " / ".join(f"{v:.3f}" for v in get(n, "collapse")) + " |" for n in coll]
    return "\n".join(out) + "\n"


def roi_settings(path):
    """extract_roi.py's --tau/--delta/--min-crop of an existing ROI bank (its metadata), so that the random-
    encoder row is extracted exactly as the data it is compared with."""
    from safetensors import safe_open
    with safe_open(path, "pt") as f:
        meta = f.metadata() or {}
    return [a for key in ("tau", "delta", "min_crop") if key in meta
            for a in (f"--{key.replace('_', '-')}", meta[key])]


def ensure_evidence_inputs(args):
    """The random-encoder copy of --data (same samples, ROI features from the random tiny SigLIP) and the
    backbone-alone evaluation -> its accuracy per question type."""
    if not os.path.isfile(os.path.join(args.data_random, "roi.safetensors")):
        os.makedirs(args.data_random, exist_ok=True)
        for name in ("samples.jsonl", "images", "masks"):
            link = os.path.join(args.data_random, name)
            if not os.path.lexists(link):
                os.symlink(os.path.relpath(os.path.join(args.data, name), args.data_random), link)
        cmd = [PY, "extract_roi.py", "--samples", os.path.join(args.data_random, "samples.jsonl"), "--encoder",
               os.path.join(args.models, "encoder"), "--out", os.path.join(args.data_random, "roi.safetensors"),
               "--quiet"] + roi_settings(os.path.join(args.data, "roi.safetensors"))
        print("$ " + " ".join(shlex.quote(c) for c in cmd), flush=True)
        subprocess.run(cmd, check=True, cwd=ROOT)
    ev = os.path.join(args.out, "backbone_alone")
    if not os.path.isfile(os.path.join(ev, "metrics.json")):
        cmd = [PY, "evaluate.py", "--ckpt", os.path.dirname(os.path.normpath(args.backbone)), "--data", args.data,
               "--out", ev, "--k", "0"]
        print("$ " + " ".join(shlex.quote(c) for c in cmd), flush=True)
        subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    return by_type(ev, args.data)


def ensure_inputs(args):
    """Models, data and ROI features with demo.py's commands, if they are not there yet."""
    steps = [([PY, "embedded/tiny.py", args.models], os.path.join(args.models, "encoder", "config.json")),
             ([PY, "prepare_data.py", "--source", "phantom", "--out", args.data, "--n", str(args.n),
               "--image-size", str(args.image_size)], os.path.join(args.data, "stats.json")),
             ([PY, "extract_roi.py", "--samples", os.path.join(args.data, "samples.jsonl"), "--encoder",
               os.path.join(args.models, "encoder"), "--out", os.path.join(args.data, "roi.safetensors"),
               "--quiet"],
              os.path.join(args.data, "roi.safetensors"))]
    for cmd, done in steps:
        if not os.path.exists(done):
            print("$ " + " ".join(shlex.quote(c) for c in cmd), flush=True)
            subprocess.run(cmd, check=True, cwd=ROOT)


def main(argv=None):
    args = get_args(argv)
    args.out = args.out or ("runs/evidence" if args.suite == "evidence" else "runs/ablate")
    os.chdir(ROOT)  # relative paths (--out, --data, ...) start at the repository root, as in demo/run.py
    if args.backbone and not os.path.isfile(os.path.join(args.backbone, "config.json")):
        sys.exit(f"ablate.py: error: no backbone at {args.backbone}: run demo/run.py --six-types first "
                 "(it copies the shipped pretrained tiny backbone there), or pass --backbone "
                 "embedded/pretrained/pretrain/phase1/backbone, or '' to freeze the random one")
    ensure_inputs(args)
    os.makedirs(args.out, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 2) // args.jobs)))
    evidence = args.suite == "evidence"
    backbone_alone = ensure_evidence_inputs(args) if evidence else None
    cfgs = {n: c for n, c in (EVIDENCE if evidence else configs()).items() if not args.only or n in args.only}
    jobs = [(n, s) for s in args.seeds for n in cfgs]  # seed-major: a partial run still covers every config
    res = {}
    t0 = time.time()
    with ThreadPoolExecutor(args.jobs) as pool:
        futs = [pool.submit(evidence_run, args, n, s, env) if evidence else
                pool.submit(one_run, args, n, s, cfgs[n], env) for n, s in jobs]
        for f in futs:
            try:
                name, seed, r = f.result()
                res.setdefault(name, {})[seed] = r
            except subprocess.CalledProcessError as e:
                print(f"[failed] {e.cmd[:3]}... exit {e.returncode} (see the run's commands.log)", flush=True)
    md = evidence_tables(args, res, backbone_alone) if evidence else tables(args, res)
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(md)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"args": vars(args), "wall_s_this_run": round(time.time() - t0, 1),
                   "runs": {n: {str(s): r for s, r in v.items()} for n, v in res.items()}}, f, indent=2,
                  allow_nan=False)
    argv = sys.argv[1:] if argv is None else argv
    cmd = "python demo/ablate.py " + " ".join(shlex.quote(a) for a in argv)
    with open(os.path.join(HERE, "evidence.md" if evidence else "ablations.md"), "w") as f:
        f.write(f"# {'Evidence' if evidence else 'Ablations'} in miniature\n\nWritten by `{cmd.strip()}` on "
                f"{time.strftime('%Y-%m-%d %H:%M')} "
                f"({os.cpu_count()} cores); {(time.time() - t0) / 60:.1f} min this run. Per-run numbers: "
                f"{args.out}/results.json.\n\n" + md)
    print("\n" + md)
    print(f"wrote {args.out}/results.md, results.json and demo/{'evidence' if evidence else 'ablations'}.md "
          f"({(time.time() - t0) / 60:.1f} min this run)")


if __name__ == "__main__":
    main()
