"""
The embedded default: the tiny models, the phantom data, the two pretrained stand-ins and the ROI features
that `python train.py` with no --data trains on, and that the demo (demo/run.py) starts from. Each is made by
its documented command line, printed before it runs and skipped when its output exists:

    python embedded/tiny.py OUT/models                         -> OUT/models/{backbone,decoder,encoder}
    python prepare_data.py --source phantom --out OUT/data ...  -> OUT/data/samples.jsonl, images/, masks/
    copied from embedded/pretrained/ (stand_ins.json)           -> OUT/pretrain/, OUT/encoder_pretrained/
    python extract_roi.py ...                                   -> OUT/data/roi.safetensors

OUT is runs/demo in the repository, or $VITAL_DEMO_DIR. train.py calls make_default; demo/run.py runs the
same commands with its own flags, whose defaults are SETTINGS. No torch here: this file starts subprocesses.
"""
import argparse
import hashlib
import json
import os
import shlex
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository root: commands run there
PY = sys.executable
# The settings that shape the models, the data, the stand-ins and the ROI features: the embedded default's,
# and the defaults of demo/run.py's flags of the same names.
# tau: the phantom's targets cover 1-8% of the image, so at extract_roi.py's default tau (0.1) every ROI
# feature came from a re-encoded crop, which the tiny 8 x 8-patch encoder represents unlike any patch of
# the full image: the ROI features themselves then point at their target in only 54% of the test items
# (the pointing game's ceiling), against 94% when pooled from the full image (tau 0). Measured in
# docs/tuning-log.md; a real run keeps extract_roi.py's default.
SETTINGS = dict(n=3000, image_size=96, data_seed=0, hidden=64, layers=2, pretrain_n=3000, pretrain_epochs=6,
                pretrain_lr=2e-3, encoder="pretrained", encoder_epochs=20, pretrain_seed=0, tau=0.0)


# ----------------------------------------------------------------------------------------------------
# Running a stage: its command line, printed, from the repository root.
# ----------------------------------------------------------------------------------------------------
def run(cmd, skip_if=None, what="", log=None):
    """Print the exact command, then run it (or say why it is skipped). With `log` (a stage that runs beside
    another one) its output goes to that file and it gets one thread (OMP_NUM_THREADS=1)."""
    line = " ".join(shlex.quote(c) for c in cmd)
    if skip_if and os.path.exists(skip_if):
        print(f"[skip] {what}: {skip_if} exists\n    $ {line}", flush=True)
        return 0.0
    print(f"\n[run] {what}" + (f" (output: {log})" if log else "") + f"\n    $ {line}", flush=True)
    t0 = time.time()
    if log:
        os.makedirs(os.path.dirname(log), exist_ok=True)
        with open(log, "a") as f:
            subprocess.run(cmd, check=True, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"), stdout=f,
                           stderr=subprocess.STDOUT)
    else:
        subprocess.run(cmd, check=True, cwd=ROOT)
    dt = time.time() - t0
    print(f"[done] {what} in {dt:.0f}s", flush=True)
    return dt


def run_graph(nodes, jobs):
    """Run stages as soon as their inputs are ready, `jobs` at a time, each fn in a thread of this process (so a fn
    that computes starts a subprocess). nodes: [(name, fn, deps)] in priority order, deps the names of other nodes;
    a free worker takes the first node, in list order, whose deps have all finished. A node whose dep failed is not
    run: it fails with the same exception. -> ({name: fn()}, {name: the exception it or its dep raised})."""
    from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
    known = {name for name, _, _ in nodes}
    if len(known) != len(nodes):
        raise ValueError("run_graph: two nodes share a name")
    for name, _, deps in nodes:
        if missing := [d for d in deps if d not in known]:
            raise ValueError(f"run_graph: node {name!r} waits for {missing}, which no node makes")
    jobs, results, errors, running, pending = max(1, jobs), {}, {}, {}, list(nodes)
    with ThreadPoolExecutor(jobs) as pool:
        while pending or running:
            changed = True
            while changed:  # settle the nodes a failure dooms, then start what is ready
                changed = False
                for node in list(pending):
                    name, fn, deps = node
                    if failed := next((d for d in deps if d in errors), None):
                        errors[name] = errors[failed]
                        pending.remove(node)
                        changed = True
                    elif len(running) < jobs and all(d in results for d in deps):
                        running[pool.submit(fn)] = name
                        pending.remove(node)
                        changed = True
            if not running:  # nothing runs and nothing can start: the deps go round in a circle
                raise ValueError(f"run_graph: {[n for n, _, _ in pending]} wait for each other")
            for f in wait(running, return_when=FIRST_COMPLETED).done:
                name = running.pop(f)
                try:
                    results[name] = f.result()
                except Exception as e:  # noqa: BLE001 -- handed to the caller, which says what failed
                    errors[name] = e
    return results, errors


def phase_finished(phase_dir):
    """Has the training phase in this folder run all its steps (its trainer/state.json says so)?"""
    p = os.path.join(phase_dir, "trainer", "state.json")
    if not os.path.isfile(p):
        return False
    with open(p) as f:
        return bool(json.load(f).get("finished"))


# ----------------------------------------------------------------------------------------------------
# Stages 1-3 of the embedded default: tiny models, phantom data, ROI features.
# ----------------------------------------------------------------------------------------------------
def make_data(args, paths, timings):
    """Stages 1-2: tiny models, phantom data with the geometry teacher."""
    models, data = paths["models"], paths["data"]
    timings["models"] = run([PY, "embedded/tiny.py", models, "--hidden", str(args.hidden),
                             "--layers", str(args.layers)],
                            skip_if=os.path.join(models, "encoder", "config.json"), what="tiny models")
    timings["data"] = run([PY, "prepare_data.py", "--source", "phantom", "--out", data, "--n", str(args.n),
                           "--seed", str(args.data_seed), "--image-size", str(args.image_size),
                           "--teacher", "geometry"],
                          skip_if=os.path.join(data, "stats.json"), what="phantom data set")


def roi_features(args, paths, timings):
    """Stage 3: the ROI features (L_vis targets) from the pretrained tiny encoder (or the random one with
    --encoder random: the comparison row of the pointing game)."""
    timings["roi"] = run([PY, "extract_roi.py", "--samples", os.path.join(paths["data"], "samples.jsonl"),
                          "--encoder", paths["encoder"], "--out", paths["roi"], "--tau", f"{args.tau:g}",
                          "--quiet"],
                         skip_if=paths["roi"], what=f"ROI features ({args.encoder} encoder)",
                         log=paths.get("roi_log"))


# ----------------------------------------------------------------------------------------------------
# The shipped stand-ins. The two stand-ins are what a real run downloads: Qwen3-VL and MedSigLIP arrive
# pretrained. Making them takes 8 of the demo's 15 minutes on 2 cores, so the repository ships the ones
# `demo/run.py --rebuild-stand-ins --ship` made (1.6 MB of safetensors, listed with their sha256 and the
# settings that shaped them in stand_ins.json). A run copies each one whose settings equal its own into the
# run folder, where the stages find it finished.
# ----------------------------------------------------------------------------------------------------
SHIPPED = os.path.join(ROOT, "embedded", "pretrained")
STAND_INS = {  # run-folder entry -> the settings (demo/run.py's arguments) that shape it
    "pretrain": ("hidden", "layers", "image_size", "data_seed", "pretrain_n", "pretrain_epochs", "pretrain_lr",
                 "pretrain_seed"),
    "encoder_pretrained": ("image_size", "data_seed", "pretrain_n", "encoder_epochs", "pretrain_seed"),
}


def stand_ins_needed(args):
    return [name for name, need in (("pretrain", args.pretrain_epochs > 0),
                                    ("encoder_pretrained", args.encoder == "pretrained")) if need]


def stand_in_done(name, paths):
    if name == "pretrain":
        return phase_finished(os.path.join(paths["pretrain"], "phase1"))
    return os.path.isfile(os.path.join(paths["encoder_pretrained"], "pretrain.json"))


def sha256(path):
    """pipeline.io.file_sha256's hash, written out here: importing pipeline.io would load torch into the demo's
    orchestrator, which only starts subprocesses."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def copy_files(src, dst, rels):
    """Copy the files `rels` (paths relative to src) from src to dst, making the folders they need."""
    for rel in rels:
        os.makedirs(os.path.dirname(os.path.join(dst, rel)), exist_ok=True)
        shutil.copy2(os.path.join(src, rel), os.path.join(dst, rel))


def copy_verified(shipped, name, files, dst, who, rebuild_flag):
    """Copy the shipped stand-in `name` ({relative path: sha256} of stand_ins.json) to dst, after checking every
    file's sha256: one that differs (a broken checkout, a Git LFS pointer) is refused by name before anything is
    copied, and a killed copy leaves only dst.part, never a half stand-in at dst."""
    for rel, digest in files.items():
        src = os.path.join(shipped, name, rel)
        if not os.path.isfile(src) or sha256(src) != digest:
            sys.exit(f"{who}: error: {src}: missing or not the file {os.path.join(shipped, 'stand_ins.json')} lists "
                     f"(sha256 {digest[:12]}...); restore it (git checkout) or pass {rebuild_flag}")
    shutil.rmtree(dst + ".part", ignore_errors=True)
    copy_files(os.path.join(shipped, name), dst + ".part", files)
    os.replace(dst + ".part", dst)


def copy_shipped(args, paths, shipped=SHIPPED):
    """Copy the shipped stand-ins that were made with this run's settings into the run folder (one already
    there is kept: it is a finished or resumable stage). -> the names copied. A shipped file whose sha256
    differs from the manifest (a broken checkout, a Git LFS pointer) is refused by name."""
    manifest_path = os.path.join(shipped, "stand_ins.json")
    if not os.path.isfile(manifest_path):
        return []
    with open(manifest_path) as f:
        manifest = json.load(f)
    copied = []
    for name in stand_ins_needed(args):
        entry, dst = manifest.get(name), paths[name]
        if os.path.exists(dst):
            if args.rebuild_stand_ins and entry and all(
                    os.path.isfile(os.path.join(dst, rel)) and sha256(os.path.join(dst, rel)) == digest
                    for rel, digest in entry["files"].items()):
                sys.exit(f"run.py: error: --rebuild-stand-ins, but {dst} is the shipped stand-in copied by an "
                         "earlier run; pass a fresh --out (or delete that folder) to train it here")
            continue
        if args.rebuild_stand_ins:
            continue
        mine = {k: getattr(args, k) for k in STAND_INS[name]}
        if entry is None or entry["args"] != mine:
            theirs = (entry or {}).get("args", {})
            diff = ", ".join(f"--{k.replace('_', '-')} {mine[k]} (shipped: {theirs.get(k)})"
                             for k in mine if mine[k] != theirs.get(k))
            print(f"[rebuild] {name}: this run's {diff} differ from the shipped stand-in", flush=True)
            continue
        copy_verified(shipped, name, entry["files"], dst, "run.py", "--rebuild-stand-ins")
        print(f"[shipped] {name}: copied {len(entry['files'])} files from {os.path.join(shipped, name)} "
              f"(made in {entry['seconds']:.0f}s by: {entry['commands'][-1]})", flush=True)
        copied.append(name)
    return copied


# ----------------------------------------------------------------------------------------------------
# The embedded default of train.py: where it lives, and making what is missing.
# ----------------------------------------------------------------------------------------------------
def default_paths():
    """-> (models, data, backbone) of the embedded default under runs/demo in the repository (or
    $VITAL_DEMO_DIR). The backbone is the demo's pretrained tiny one: the run folder's, else the one shipped in
    embedded/pretrained/ (None if neither: a random tiny backbone cannot see)."""
    base = os.path.abspath(os.environ.get("VITAL_DEMO_DIR") or os.path.join(ROOT, "runs", "demo"))
    backbone = next((p for p in (os.path.join(base, "pretrain", "phase1", "backbone"),
                                 os.path.join(SHIPPED, "pretrain", "phase1", "backbone"))
                     if os.path.isfile(os.path.join(p, "config.json"))), None)
    return os.path.join(base, "models"), os.path.join(base, "data"), backbone


def make_default(models, data):
    """What train.py with no --data needs when the demo has not run yet: the tiny models, the phantom data,
    the shipped stand-ins next to them, and the ROI features from the shipped pretrained encoder (from the
    random tiny one if the shipped one does not fit, as the demo's --encoder random does)."""
    args = argparse.Namespace(**SETTINGS, rebuild_stand_ins=False)
    base = os.path.dirname(data)
    paths = dict(models=models, data=data, roi=os.path.join(data, "roi.safetensors"),
                 pretrain=os.path.join(base, "pretrain"), encoder_pretrained=os.path.join(base, "encoder_pretrained"))
    make_data(args, paths, {})
    copy_shipped(args, paths)
    paths["encoder"] = paths["encoder_pretrained"] if stand_in_done("encoder_pretrained", paths) else \
        os.path.join(models, "encoder")
    roi_features(args, paths, {})
