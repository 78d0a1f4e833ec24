"""
The log of a training run: <out>/log.jsonl, one strict-JSON line per optimizer step (losses, lr, grad norm,
speed, peak memory; trimmed back to the checkpoint a phase starts from), and <out>/loss.png drawn from it
(PIL only: no plotting library to install). train.py writes both, and prints L_vis beside what a projector
that ignores the item would score (lvis_baselines).
"""
import json
import math
import os

import torch.nn.functional as F
from PIL import Image, ImageDraw


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


def write_log_line(log_path, bar, entry):
    """Append one log.jsonl line (strict JSON) and move the progress bar on."""
    with open(log_path, "a") as f:
        f.write(json.dumps(entry, allow_nan=False) + "\n")
    bar.update(1)
    bar.set_postfix(L_task=f"{entry['L_task']:.3f}", L_sem=f"{entry['L_sem']:.3f}",
                    L_vis=f"{entry['L_vis']:.3f}", lr=f"{entry['lr']:.2e}")


def lvis_baselines(roi):
    """What eq. 6's L1 gives a projector that ignores the item (issue 25): always the zero vector, always the
    mean target; and the mean target's cosine to the targets. roi: (N, d_v) this phase's targets, or (N, S, d_v)
    a target per step (then the mean is each step's own)."""
    mean = roi.mean(0, keepdim=True)
    return dict(zero=roi.abs().mean().item(), mean=(roi - mean).abs().mean().item(),
                mean_cos=F.cosine_similarity(roi, mean.expand_as(roi), dim=-1).mean().item())


def tail_means(log_path, phase, keys, n=50):
    """Means of `keys` over the last n log.jsonl lines of `phase` -> dict(n=lines used, key=mean), {} if none."""
    with open(log_path) as f:
        rows = [json.loads(l) for l in f if l.endswith("\n")]
    rows = [r for r in rows if r.get("phase") == phase and all(k in r for k in keys)][-n:]
    return dict(n=len(rows), **{k: sum(r[k] for r in rows) / len(rows) for k in keys}) if rows else {}


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
