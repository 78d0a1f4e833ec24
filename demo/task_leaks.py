"""
Does a task need several passes? What a reader that computes no hop gets from an item's true findings, before
any model is trained on it (issue 25: "prove the need for passes first"). Per number of hops, on drawn
findings only (no image, no model; seconds on a CPU):
  linear     a ridge probe on the findings (one-hot) and the start: what one attention layer that gathers the
             findings and a linear read-out give;
  quadratic  the same probe on the findings and every product of two: one MLP layer more;
  lookup     the train split's answer for the same findings and start (its most common answer when it has
             none): what memory gives, however deep the rule;
beside the most common answer. A task that needs p passes leaves all three near that majority for p >= 4.

Tasks (--task):
  walk   the phantom's walk (embedded/phantom.walk): 3 x 3 lesions, a darker one sends you one cell right, a
         brighter one down, wrapping round, from the upper-left cell (--start random: from a stated random cell)
  s3     the phantom's order question (embedded/phantom.py, prepare_data.py --order-hops): three numbers; the
         lesions are read in reading order, and each of four findings (small or large, times darker or brighter)
         sends the first to the end or swaps two of them; the answer is their order after the first N lesions

    python demo/task_leaks.py                      # the walk as demo/walk.py trains it (1-6 moves)
    python demo/task_leaks.py --task s3 --hops 1 2 3 4 5 6 9
"""
import argparse
import itertools
from collections import Counter, defaultdict
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from demo.diagnose import majority, ridge_accuracy  # noqa: E402
from embedded.phantom import CELLS, S3_MOVES, walk  # noqa: E402  (S3_MOVES: the order question's rule)

ORDERS = list(itertools.permutations(range(3)))


def draw(task, hops, n, rng, start="fixed"):
    """-> (the findings the answer can depend on (n, 9 or hops) ints, start cell index (n,), answer (n,)) for n
    items of `hops` hops (the walk can visit any lesion; s3 reads the first `hops`)."""
    if task == "walk":
        bits = rng.integers(0, 2, (n, 9))  # 1: darker
        starts = np.zeros(n, int) if start == "fixed" else rng.integers(0, 9, n)
        ends = [walk([["darker" if b else "brighter" for b in row] for row in f.reshape(3, 3)], CELLS[s], hops)[-1]
                for f, s in zip(bits, starts)]
        return bits, starts, np.array([CELLS.index(e) for e in ends])
    finds = rng.integers(0, 4, (n, 9))
    answers = []
    for f in finds:
        order = (0, 1, 2)
        for g in f[:hops]:
            order = tuple(order[i] for i in S3_MOVES[g])
        answers.append(ORDERS.index(order))
    return finds[:, :hops], np.zeros(n, int), np.array(answers)  # the lesions read: all the answer can depend on


def levels(finds, starts, y, n_train):
    """-> {majority, linear, quadratic, lookup}: % right on the items after the first n_train."""
    width = finds.max() + 1
    onehot = np.concatenate([np.eye(width)[finds].reshape(len(finds), -1), np.eye(9)[starts]], 1)
    i, j = np.triu_indices(onehot.shape[1], 1)
    train = torch.arange(len(y)) < n_train
    yt = torch.tensor(y)
    probe = lambda X: ridge_accuracy(torch.tensor(X, dtype=torch.float32), yt, train)
    keys = [bytes(row) for row in np.concatenate([finds, starts[:, None]], 1).astype(np.int8)]
    memory, fallback = defaultdict(Counter), np.bincount(y[:n_train]).argmax()
    for key, a in zip(keys[:n_train], y):
        memory[key][a] += 1
    recalled = [memory[k].most_common(1)[0][0] if k in memory else fallback for k in keys[n_train:]]
    return {"majority": majority(yt, train), "linear": probe(onehot),
            "quadratic": probe(np.concatenate([onehot, onehot[:, i] * onehot[:, j]], 1)),
            "lookup": 100 * float(np.mean(np.array(recalled) == y[n_train:]))}


def main(argv=None):
    ap = argparse.ArgumentParser(description="what a reader that computes no hop gets from the true findings")
    ap.add_argument("--task", choices=["walk", "s3"], default="walk")
    ap.add_argument("--start", choices=["fixed", "random"], default="fixed", help="the walk's start cell")
    ap.add_argument("--hops", type=int, nargs="+", default=[1, 2, 3, 4, 5, 6], help="moves, or lesions read")
    ap.add_argument("--train", type=int, default=800, help="train items per hop count (demo/walk.py: ~800)")
    ap.add_argument("--test", type=int, default=1000, help="test items per hop count")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.task == "s3" and args.start != "fixed":
        ap.error("--start is the walk's; the s3 task reads the lesions from the first")
    if any(not 1 <= h <= 9 for h in args.hops):
        ap.error(f"--hops must be 1..9 (nine lesions), got {args.hops}")
    rng = np.random.default_rng(args.seed)
    print(f"{args.task}{' from a random start' if args.task == 'walk' and args.start == 'random' else ''}: % of "
          f"{args.test} test items per hop count, probes fit on {args.train} train items (seed {args.seed})\n")
    print("| hops | majority | linear | quadratic | lookup |\n|---:|---:|---:|---:|---:|")
    out = {}
    for h in args.hops:
        out[h] = levels(*draw(args.task, h, args.train + args.test, rng, args.start), args.train)
        print(f"| {h} | " + " | ".join(f"{out[h][k]:.1f}" for k in ("majority", "linear", "quadratic", "lookup"))
              + " |", flush=True)
    return out


if __name__ == "__main__":
    main()
