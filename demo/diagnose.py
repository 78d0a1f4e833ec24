"""
Why does the miniature VITAL not beat its K = 0 model? Two measurements on the demo's artifacts.

1. What the frozen backbone can see: ridge probes (fit on the train split, scored on the test split) of
   each finding the phantom's questions ask about, from (a) the image tokens the backbone feeds its LLM
   (concatenated) and (b) h_0, the last prompt state after the LLM (the state the latent loop starts
   from), beside the majority-class rate. A finding that no linear probe reads from the image tokens is
   a finding no LoRA on the LLM can learn to use.
2. What VITAL's latent states hold (with --ckpt): the same probes from h_0..h_4 of its own loop on the
   reasoning (grading rule) items; and what its steps say: on the reasoning test items, every step is
   decoded through the scaffold decoder (explain.py's text window) and each finding the steps state is
   compared with the measured one; also how often the total the steps state is the gold total.

3. On the walk (--walk, issue 25): does the K = 0 model's h_0 already hold the cell a walk ends in (a
   question that needs more passes than one should not), and does VITAL's h_j hold the cell after move j?
   Ridge probes beside two baselines: the most common cell, and the same probe on the nine true brightness
   bits (a fixed-start walk's end is partly a linear function of them: what a state that holds the findings
   gives a linear probe with no hop computed). demo/walk.py runs it on every seed. On the order question
   (prepare_data.py --order-hops) the same probes read the order after the first N lesions and after lesion j,
   and the baseline probe gets each lesion's size as well as its brightness.

    python demo/diagnose.py                                   # runs/demo's backbone, data and VITAL
                                                              # (bash demo.sh --six-types)
    python demo/diagnose.py --backbone B --data D --ckpt C    # other artifacts
    python demo/diagnose.py --walk --data runs/walk6/data --k0 runs/walk6/K0_lr0.001/s0/phase3 \
        --ckpt runs/walk6/VITAL_lr0.001/s0/phase3              # the walk's probes
Prints the tables and writes OUT/diagnose.json (default: next to --data).
"""
import argparse
import json
import os
import re
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root
import evaluate as E  # noqa: E402
import model as M  # noqa: E402
from pipeline import io as IO  # noqa: E402
import prepare_data as P  # noqa: E402
from pipeline import scaffolds as SC  # noqa: E402

FINDINGS = {"shape": ["round", "elongated", "irregular"], "boundary": ["sharp", "blurred"],
            "size": ["small", "large"], "brightness": ["brighter", "darker", "similar"],
            "h": ["left", "central", "right"], "v": ["upper", "middle", "lower"]}
RULE_KEYS = [key for key, _ in P.RULE]  # the findings the grading rule adds up


@torch.no_grad()
def features(backbone, processor, data, rows, batch=16):
    """-> (image tokens (N, n_img * d) at the LLM's input, h_0 (N, d)) for a fixed caption prompt."""
    img_tok, fv, fh = backbone.config.image_token_id, [], []
    for i in range(0, len(rows), batch):
        chunk = rows[i:i + batch]
        prefix = IO.build_prefix(processor, [IO.load_image(os.path.join(data, r["image"])) for r in chunk],
                                ["Describe this image."] * len(chunk))
        out = backbone.model(**prefix, output_hidden_states=True)
        for b in range(len(chunk)):
            fv.append(out.hidden_states[0][b, prefix["input_ids"][b] == img_tok].flatten())
            fh.append(out.last_hidden_state[b, -1])  # left padding: the last position is the prompt's last
    return torch.stack(fv), torch.stack(fh)


def ridge_accuracy(X, y, train):
    """Best test accuracy (%) of a one-vs-rest ridge classifier over three penalties, standardised inputs."""
    mu, sd = X[train].mean(0), X[train].std(0) + 1e-6
    X = torch.cat([(X - mu) / sd, torch.ones(len(X), 1)], 1)
    Y = torch.nn.functional.one_hot(y, int(y.max()) + 1).float()
    best = 0.0
    for lam in (1.0, 10.0, 100.0):
        W = torch.linalg.solve(X[train].T @ X[train] + lam * torch.eye(X.shape[1]), X[train].T @ Y[train])
        best = max(best, ((X[~train] @ W).argmax(1) == y[~train]).float().mean().item())
    return 100 * best


def majority(y, train):
    """The most common class's share (%) of the test rows (~train): what a probe gets that reads nothing."""
    return 100 * torch.bincount(y[~train]).max().item() / int((~train).sum())


def perception(args):
    backbone, processor = IO.load_backbone(args.backbone)
    backbone.eval()
    rows = [r for _, r in IO.read_jsonl(os.path.join(args.data, "samples.jsonl"), E.EvalError)
            if r.get("question_type") != "caption"][:args.n]
    fv, fh = features(backbone, processor, args.data, rows)
    train = torch.tensor([r["split"] != "test" for r in rows])
    out = {}
    for name, opts in FINDINGS.items():
        y = torch.tensor([opts.index(r["meta"]["facts"][name]) for r in rows])
        out[name] = dict(image_tokens=ridge_accuracy(fv, y, train), h0=ridge_accuracy(fh, y, train),
                         majority=majority(y, train))
    return dict(n_train=int(train.sum()), n_test=int((~train).sum()), findings=out)


def reasoning_rows(args, n=500):
    """The first n reasoning (grading rule) items of samples.jsonl, train and test split."""
    return [r for _, r in IO.read_jsonl(os.path.join(args.data, "samples.jsonl"), E.EvalError)
            if r.get("question_type") == "reasoning"][:n]


@torch.no_grad()
def loop_states(backbone, processor, args, rows, K):
    """h_0..h_K of a model's own loop on `rows`, each asked its own question with its options, as evaluate.py
    asks it -> (N, K + 1, d)."""
    hs = []
    for i in range(0, len(rows), 16):
        chunk = rows[i:i + 16]
        prefix = IO.build_prefix(processor, [IO.load_image(os.path.join(args.data, r["image"])) for r in chunk],
                                [IO.ask(r["question"], r.get("choices")) for r in chunk])
        hs.append(torch.cat(M.latent_loop(backbone, prefix, K).h, dim=1))                  # (B, K + 1, d)
    return torch.cat(hs)


def latent_probes(hs, rows):
    """Ridge probes of each rule finding, and of the rule's total (0-4 points, the number the answer must
    state), from each of h_0..h_K (hs: loop_states): does the latent chain hold what the steps should state,
    and is the total already in h_0, the state a K = 0 model answers from?
    -> {finding: {h: [acc h_0..h_K], majority}}."""
    train = torch.tensor([r["split"] != "test" for r in rows])
    labels = {name: [FINDINGS[name].index(r["meta"]["facts"][name]) for r in rows] for name in RULE_KEYS}
    labels["total"] = [int(re.search(r"(\d) of 4", r["answer"]).group(1)) for r in rows]
    out = {}
    for name, y in labels.items():
        y = torch.tensor(y)
        out[name] = dict(h=[ridge_accuracy(hs[:, k], y, train) for k in range(hs.shape[1])],
                         majority=majority(y, train))
    return dict(n_train=int(train.sum()), n_test=int((~train).sum()), findings=out)


def walk_rows(args):
    """Every walk or order item of samples.jsonl (train and test split): the issue's multi-hop questions (both
    keep their states in meta.drawn.path: the cell after each move, the order after each lesion)."""
    return [r for _, r in IO.read_jsonl(os.path.join(args.data, "samples.jsonl"), E.EvalError)
            if r.get("question_type") in ("walk", "order")]


def walk_probes(hs, rows):
    """Ridge probes on walk items (hs: loop_states, (N, K + 1, d)). Does a state hold
    - 'end': the cell the walk ends in (the answer), per number of moves (a probe per count, fit on its train
      items), beside the majority cell and beside the same probe on the nine true brightness bits
      ('findings_linear': what a state that holds the findings, and has computed no hop, reads by a linear
      map alone): a K = 0 model's h_0 should read the end of a 4+ move walk no better than that;
    - 'after_move': the cell after move j, over the items of j or more moves, from each of h_0..h_K (VITAL's
      h_j should read move j: each latent step one hop), beside the same 'findings_linear' baseline;
    - 'brightness': each cell's lesion, darker or brighter (the findings a hop decides on), mean over the nine
      cells, from each state: the findings must be readable while the end is not.
    -> {'end': {moves: {h, majority, n_test}}, 'after_move': {j: {h, majority}}, 'brightness': {h, majority}}."""
    split = torch.tensor([r["split"] != "test" for r in rows])
    drawn = [r["meta"]["drawn"] for r in rows]
    cells = sorted({c for d in drawn for c in d["path"]})
    moves = torch.tensor([d["hops"] for d in drawn])

    def probe(sel, y):  # ridge accuracy of each state, and the majority rate, on the rows in sel
        y, train = torch.tensor(y), split[sel]
        return dict(h=[ridge_accuracy(hs[sel, k], y, train) for k in range(hs.shape[1])],
                    majority=majority(y, train), n_test=int((~train).sum()))

    # the nine lesions' findings themselves (brightness; and size, on an order grid): how much of the end a linear
    # probe reads with no hop computed
    bits = torch.tensor([[float(x in ("darker", "large")) for g in ("grid", "sizes") for row in d.get(g, [])
                          for x in row] for d in drawn])

    def cell_probe(sel, at):  # the cell at path[at] on the rows in sel, from each state and from the bits
        y = [cells.index(d["path"][at]) for d, s in zip(drawn, sel) if s]
        return dict(probe(sel, y), findings_linear=ridge_accuracy(bits[sel], torch.tensor(y), split[sel]))

    both = lambda sel: bool(split[sel].any()) and bool((~split[sel]).any())  # train and test items to probe
    steps = range(1, int(moves.max()) + 1)
    out = {"end": {m: cell_probe(moves == m, -1) for m in steps if both(moves == m)},
           "after_move": {j: cell_probe(moves >= j, j) for j in steps if both(moves >= j)}}
    per_cell = [probe(torch.ones(len(rows), dtype=torch.bool), bits[:, i].long().tolist()) for i in range(9)]  # darker
    out["brightness"] = dict(h=[sum(p["h"][k] for p in per_cell) / 9 for k in range(hs.shape[1])],
                             majority=sum(p["majority"] for p in per_cell) / 9)
    return out


def print_walk_probes(name, wp):
    """The tables of walk_probes."""
    n = len(wp["brightness"]["h"])
    hcols = " | ".join(f"h_{k}" for k in range(n))
    print(f"\n{name}: the end cell (the answer) from h_0, by moves (ridge probe %):\n| moves | test items | h_0 | "
          "the nine true brightness bits | majority |\n|---:|---:|---:|---:|---:|")
    for m, v in wp["end"].items():
        print(f"| {m} | {v['n_test']} | {v['h'][0]:.1f} | {v['findings_linear']:.1f} | {v['majority']:.1f} |")
    print(f"\n{name}: the cell after move j, and each lesion's brightness (ridge probe %):\n| label | {hcols} | "
          f"the nine true brightness bits | majority |\n|---|" + "---:|" * (n + 2))
    for j, v in wp["after_move"].items():
        print(f"| cell after move {j} | " + " | ".join(f"{a:.1f}" for a in v["h"]) +
              f" | {v['findings_linear']:.1f} | {v['majority']:.1f} |")
    b = wp["brightness"]
    print("| lesion brightness (mean of 9 cells) | " + " | ".join(f"{a:.1f}" for a in b["h"]) +
          f" | 100 | {b['majority']:.1f} |")


@torch.no_grad()
def decoder_reads_latents(vital, dec_tok, hs, rows, n=256):
    """Does the auxiliary decoder read the latents? L_sem (eq. 4, model.decoder_loss: teacher-forced token
    CE) on the first n reasoning chains with each item's own h_1..h_4 (hs: loop_states), with another item's
    (shifted within a batch of 16), and with zeros. A decoder that reads its latent does much worse on
    another item's."""
    g, out, used = torch.Generator().manual_seed(0), {"own": [], "shuffled": [], "zero": []}, 0
    for i in range(0, min(n, len(rows)), 16):
        chunk, h = rows[i:i + 16], hs[i:i + 16, 1:]                                         # (B, 4, d)
        if len(chunk) < 2:  # nothing to shuffle with
            break
        used += len(chunk)
        ids, mask = IO.tokenize_steps(dec_tok, [r["reasoning_chain"] for r in chunk], 4)
        perm = torch.roll(torch.arange(len(chunk)), 1 + int(torch.randint(len(chunk) - 1, (1,), generator=g)))
        for name, hh in (("own", h), ("shuffled", h[perm]), ("zero", torch.zeros_like(h))):
            out[name].append(M.decoder_loss(vital.decoder, vital.pj_in, hh, ids, mask).item() * len(chunk))
    return {name: sum(v) / used for name, v in out.items()}


@torch.no_grad()
def chain_findings(args):
    vital, processor, dec_tok, _ = SC.load_explainer(args.ckpt, torch.device("cpu"), torch.float32)
    if dec_tok is None:
        raise SystemExit(f"diagnose.py: error: {args.ckpt} has no decoder scaffold (trained with --lambda-sem 0)")
    rows = reasoning_rows(args)
    hs = loop_states(vital.backbone, processor, args, rows, 4)  # one pass serves the probes and the decoder
    latent, reads = latent_probes(hs, rows), decoder_reads_latents(vital, dec_tok, hs, rows)
    items = [it for it in E.read_test_split(args.data) if it.get("question_type") == "reasoning"]
    said = {k: [0, 0] for k in RULE_KEYS}
    total_ok, examples = 0, []
    for i in range(0, len(items), 8):
        chunk = items[i:i + 8]
        prefix = IO.build_prefix(processor, [IO.open_image(it["image_path"], E.EvalError) for it in chunk],
                                [it["prompt"] for it in chunk])
        h = torch.cat(M.latent_loop(vital.backbone, prefix, 4).h[1:], dim=1)              # (B, 4, d)
        steps = M.decode_latent(vital.decoder, vital.pj_in, dec_tok, h.reshape(-1, h.shape[-1]), 30)
        for b, it in enumerate(chunk):
            text, facts = " ".join(steps[4 * b:4 * b + 4]).lower(), it["meta"]["facts"]
            for k in said:
                first = [o for o in FINDINGS[k] if re.search(rf"\b{o}\b", text)][:1]
                said[k][0] += first == [facts[k]]
                said[k][1] += 1
            stated = re.findall(r"(\d) points? of 4", text)
            total_ok += bool(stated) and stated[-1] == re.search(r"(\d) of 4", it["answer"]).group(1)
            if len(examples) < 3:
                examples.append(dict(id=it["id"], answer=it["answer"], steps=steps[4 * b:4 * b + 4]))
    n = len(items)
    return dict(latent_probes=latent, decoder_reads=reads, n=n,
                finding_right={k: 100 * a / m for k, (a, m) in said.items()},
                total_right=100 * total_ok / max(n, 1),
                distinct_step_sentences=[len(set(steps[k::4])) for k in range(4)], examples=examples)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbone", default="runs/demo/pretrain/phase1/backbone", help="the frozen backbone")
    ap.add_argument("--data", default="runs/demo/data", help="phantom data (samples.jsonl with facts)")
    ap.add_argument("--ckpt", default="runs/demo/vital/phase3", help="a VITAL checkpoint with scaffolds ('' = skip)")
    ap.add_argument("--k0", default="", help="a K = 0 checkpoint (train.py --max-k 0): the same probes of its h_0, "
                                               "the only state it answers from ('' = skip)")
    ap.add_argument("--n", type=int, default=1600, help="samples probed (train + test split)")
    ap.add_argument("--out", help="JSON output (default DATA/diagnose.json)")
    ap.add_argument("--walk", action="store_true", help="walk data (prepare_data.py --walk-hops): probe --k0's "
                    "h_0 and --ckpt's h_0..h_K (K = the longest walk) for the end cell, each move's cell and the "
                    "lesions' brightness, instead of the tables above")
    args = ap.parse_args(argv)
    out = args.out or os.path.join(args.data, "diagnose.json")
    if args.walk:
        return walk_main(args, out)
    res = dict(perception=perception(args))
    p = res["perception"]
    print(f"What the frozen backbone can see (ridge probe accuracy %, {p['n_train']} train / {p['n_test']} test):")
    print("| finding | image tokens | h_0 | majority |\n|---|---:|---:|---:|")
    for k, v in p["findings"].items():
        print(f"| {k} | {v['image_tokens']:.0f} | {v['h0']:.0f} | {v['majority']:.0f} |")
    if args.ckpt:
        c = res["chain"] = chain_findings(args)
        lp = c["latent_probes"]
        print(f"\nWhat VITAL's latent states hold on reasoning items (ridge probe %, {lp['n_train']} train / "
              f"{lp['n_test']} test):\n| finding | h_0 | h_1 | h_2 | h_3 | h_4 | majority |\n|---|" + "---:|" * 6)
        for k, v in lp["findings"].items():
            print(f"| {k} | " + " | ".join(f"{a:.0f}" for a in v["h"]) + f" | {v['majority']:.0f} |")
        r = c["decoder_reads"]
        print(f"\nDoes the decoder read the latents? L_sem on the reasoning chains (token CE): own latents "
              f"{r['own']:.3f}, another item's {r['shuffled']:.3f}, zeros {r['zero']:.3f}")
        print(f"\nWhat VITAL's decoded latent steps state on the {c['n']} reasoning test items (% right):")
        print("| " + " | ".join(c["finding_right"]) + " | stated total | distinct sentences per step |")
        print("|" + "---:|" * (len(c["finding_right"]) + 2))
        print("| " + " | ".join(f"{v:.0f}" for v in c["finding_right"].values()) +
              f" | {c['total_right']:.0f} | {' / '.join(map(str, c['distinct_step_sentences']))} |")
    if args.k0:
        backbone, processor, _, _ = E.load_inference_model(args.k0)
        rows = reasoning_rows(args)
        k0 = res["k0"] = latent_probes(loop_states(backbone, processor, args, rows, 0), rows)
        print(f"\nWhat the K = 0 model's h_0 holds on reasoning items (ridge probe %):\n| finding | h_0 | majority |"
              "\n|---|---:|---:|")
        for k, v in k0["findings"].items():
            print(f"| {k} | {v['h'][0]:.0f} | {v['majority']:.0f} |")
    write(res, out)


def walk_main(args, out):
    """--walk: the K = 0 model's h_0 and VITAL's h_0..h_K on the walk items."""
    rows, res = walk_rows(args), {}
    if not rows:
        raise SystemExit(f"diagnose.py: error: {args.data}/samples.jsonl has no walk items (--walk)")
    K = max(r["latent_steps"] for r in rows)  # the most moves (lesions read)
    for key, ckpt, k, name in (("k0", args.k0, 0, "The K = 0 model"), ("vital", args.ckpt, K, "VITAL")):
        if ckpt:
            backbone, processor, _, _ = E.load_inference_model(ckpt)
            res[key] = walk_probes(loop_states(backbone, processor, args, rows, k), rows)
            print_walk_probes(f"{name} ({ckpt})", res[key])
    write(res, out)


def write(res, out):
    with open(out, "w") as f:
        json.dump(res, f, indent=2, allow_nan=False)
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
