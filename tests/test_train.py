"""Tests of train.py on CPU with tiny models (made once per module) and a small fixture dataset written here.

Exactness: the resume tests keep LoRA and projector dropout ON and demand bit-equal weights (the trainer
restores every rank's RNG). The DDP test sets both dropouts to 0 because each rank draws its own dropout
masks (seed + rank), so two ranks cannot reproduce one process's masks; it compares with atol 5e-6 (measured:
max |diff| ~3e-7 after 9 AdamW steps, from the different order of the fp32 gradient sums).
"""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file

from pipeline import run_log
import train
from pipeline import training_data
from embedded.tiny import make_tiny

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)


pytestmark = pytest.mark.usefixtures("one_thread")


def write_fixture(folder, n_train=24, d_v=48, seed=0):
    """Phantom-like five-tuples: a bright square or not; K cycles 1,1,2,3; 4 extra test-split rows."""
    os.makedirs(os.path.join(folder, "images"), exist_ok=True)
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n_train + 4):
        K, bright = [1, 1, 2, 3][i % 4], i % 2 == 0
        a = (rng.random((64, 64)) * 60).astype("uint8")
        if bright:
            a[16:48, 16:48] = 230
        Image.fromarray(a).save(os.path.join(folder, "images", f"{i}.png"))
        sent = "the image shows a bright round region." if bright else "the image shows a dark region."
        rows.append(dict(id=f"s{i}", image=f"images/{i}.png",
                         question="is there a bright lesion in the image?",
                         answer="yes." if bright else "no.",
                         reasoning_chain=[f"step {k}: {sent}" for k in range(K)],
                         latent_steps=K, split="train" if i < n_train else "test"))
    return write_samples(folder, rows, d_v, seed)


def write_samples(folder, rows, d_v=48, seed=0):
    """rows -> folder/samples.jsonl, and random unit ROI + global features keyed by id -> roi.safetensors."""
    with open(os.path.join(folder, "samples.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    g = torch.Generator().manual_seed(seed)
    feats = {k: F.normalize(torch.randn(len(rows), d_v, generator=g), dim=-1) for k in ("roi", "global")}
    save_file(feats, os.path.join(folder, "roi.safetensors"),
              metadata={"ids": json.dumps([r["id"] for r in rows])})
    return rows


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    base = tmp_path_factory.mktemp("train")
    models = make_tiny(str(base / "models"))
    data = str(base / "data")
    write_fixture(data)
    return dict(base=base, models=models, data=data)


def flags(env, out, *extra):
    """A small run's flags; --depth own (each item at its own K) unless extra says otherwise (argparse keeps the
    last): the admission tests count K per item. The default, --depth phase, has its own test."""
    return ["--data", env["data"], "--backbone", f"{env['models']}/backbone",
            "--decoder", f"{env['models']}/decoder", "--depth", "own",
            "--lora-r", "4", "--lora-alpha", "8", "--out", str(out), "--batch-size", "2", "--epochs", "1",
            *map(str, extra)]


def weights(folder):
    return {**load_file(f"{folder}/adapter.safetensors"), **load_file(f"{folder}/scaffold.safetensors")}


def max_diff(a, b):
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def read_log(out):
    with open(f"{out}/log.jsonl") as f:
        return [json.loads(l) for l in f if l.endswith("\n")]  # complete lines (a writer may be mid-line)


# ---------------------------------------------------------------------------------------------- sampler
def test_sampler_buckets_by_k_and_splits_evenly_over_ranks():
    ks = [1] * 7 + [2] * 5 + [3] * 2
    one = train.KBucketSampler(ks, batch_size=2, split=train.Split(world=1, rank=0, accum=4), seed=3)
    ranks = [train.KBucketSampler(ks, batch_size=2, split=train.Split(world=2, rank=r, accum=2), seed=3)
             for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == len(one) // 2  # same count on every rank: no DDP hang
    batches = list(one)
    assert all(len({ks[i] for i in b}) == 1 for b in batches)  # one K per micro-batch
    assert {i for b in batches for i in b} == set(range(len(ks)))  # every sample (padding may repeat some)
    # Optimizer step s sees the same micro-batches on 2 ranks x accum 2 as on 1 rank x accum 4.
    r0, r1 = list(ranks[0]), list(ranks[1])
    for s in range(len(one) // 4):
        assert (sorted(map(tuple, batches[4 * s:4 * s + 4]))
                == sorted(map(tuple, r0[2 * s:2 * s + 2] + r1[2 * s:2 * s + 2])))
    one.set_epoch(1)
    assert list(one) != batches  # a new order each epoch ...
    one.set_epoch(1, start=3)
    assert list(one) == _epoch(ks, 1)[3:]  # ... deterministic, and resumable mid-epoch


def _epoch(ks, epoch):
    s = train.KBucketSampler(ks, 2, train.Split(1, 0, 4), seed=3)
    s.set_epoch(epoch)
    return list(s)


# ---------------------------------------------------------------------------------------------- options (§B.4)
def write_choice_fixture(folder, n_train=12):
    """write_fixture with one question per item and choices on the even items, worded unlike `answer` (as an
    LLM teacher's answer may be): options shown must switch the target to choices[answer_index]."""
    rows = write_fixture(folder, n_train)
    for i, r in enumerate(rows):
        r["question"] = f"is there a bright lesion in image {i}?"
        if i % 2 == 0:  # bright items; the right option first or second
            ch = ["A bright lesion is seen.", "No lesion is seen."]
            r.update(choices=ch if i % 4 == 0 else ch[::-1], answer_index=0 if i % 4 == 0 else 1)
    return write_samples(folder, rows)


def test_options_rate_shows_options_per_item_and_epoch(env, tmp_path, monkeypatch):
    """--options-rate P: an item with choices is asked through model.ask with its options and answers the
    chosen option's text, in a share P of its epochs decided by a hash of (seed, phase, id, epoch): two runs, and a
    killed-and-resumed one, see the same batches; 0 shows none (the bare questions), 1 shows them on every
    item with choices; a micro-batch holds one length group of the prompts actually shown."""
    import model as M
    from pipeline import io as IO
    data = tmp_path / "d"
    rows = write_choice_fixture(str(data))
    asked = {r["question"]: (r, False) for r in rows}
    asked.update({IO.ask(r["question"], r["choices"]): (r, True) for r in rows if "choices" in r})
    seen, real = [], train.make_batch

    def spy(processor, dec_tok, images, questions, answers, *a, **k):
        seen.append([asked[q] + (a,) for q, a in zip(questions, answers)])   # (record, shown, target)
        return real(processor, dec_tok, images, questions, answers, *a, **k)
    monkeypatch.setattr(train, "make_batch", spy)

    def run(out, rate, *extra):
        seen.clear()
        train.main(flags(env, out, "--data", data, "--phase", 3, "--init", "none", "--options-rate", rate,
                         *extra))
        for batch in seen:  # the target follows the prompt
            for r, shown, target in batch:
                assert target == (r["choices"][r["answer_index"]] if shown else r["answer"])
        return [[(r["id"], shown) for r, shown, _ in b] for b in seen]

    n_train = sum(r["split"] == "train" for r in rows)
    none = run(tmp_path / "r0", 0)
    assert not any(shown for b in none for _, shown in b) and len({i for b in none for i, _ in b}) == n_train
    every = run(tmp_path / "r1", 1)
    assert all(shown == ("choices" in rows[int(i[1:])]) for b in every for i, shown in b)
    assert any(shown for b in every for _, shown in b)
    half = run(tmp_path / "a", 0.5, "--epochs", 2)
    assert run(tmp_path / "a2", 0.5, "--epochs", 2) == half                       # a rerun: the same batches
    resumed = run(tmp_path / "b", 0.5, "--epochs", 2, "--max-steps", 5)
    resumed += run(tmp_path / "b", 0.5, "--epochs", 2, "--resume")
    assert resumed == half and max_diff(weights(tmp_path / "a" / "phase3"), weights(tmp_path / "b" / "phase3")) == 0
    per_epoch = len(half) // 2
    shown = [{i for b in half[e * per_epoch:(e + 1) * per_epoch] for i, s in b if s} for e in range(2)]
    for e in range(2):  # exactly the hash's choice, and a new choice each epoch
        assert shown[e] == {r["id"] for r in rows if r["split"] == "train"
                            and train.options_shown(r, 3, e, 1337, 0.5)}
    with_choices = {r["id"] for r in rows if r["split"] == "train" and "choices" in r}
    assert shown[0] and shown[0] < with_choices and shown[0] != shown[1]   # some, not all, and not the same
    # buckets by the prompt shown: its options' tokens count (here they move an item to another length group)
    _, processor = IO.load_backbone(f"{env['models']}/backbone")
    records = training_data.read_samples(str(data / "samples.jsonl"))
    vis, extra = training_data.image_tokens(records, processor), train.option_tokens(records, processor.tokenizer)
    for b in half:
        assert len({train.length_group(vis[int(i[1:])] + extra[int(i[1:])] * s) for i, s in b}) == 1
    assert train.length_group(vis[0]) != train.length_group(vis[0] + extra[0])   # 4 image tokens, +36 options
    assert all(len({s for _, s in b}) == 1 for b in half)  # so an epoch's shown and bare prompts never mix
    assert json.load(open(tmp_path / "a" / "phase3" / "config.json"))["args"]["options_rate"] == 0.5
    from demo import pretrain  # the stand-in backbone pretraining runs train.py's phase: it learns the format
    assert pretrain.get_args(["--data", str(data), "--out", "o"]).options_rate == 0.5


def test_lr_schedule_warmup_then_cosine():
    total = 100
    f = [train.lr_factor(s, total, 0.05) for s in range(total)]
    assert f[0] == pytest.approx(0.2) and f[4] == pytest.approx(1.0)  # 5 warmup steps, linear
    assert all(a >= b for a, b in zip(f[4:], f[5:])) and f[-1] < 0.01  # then cosine down to ~0


# ---------------------------------------------------------------------------------------------- data
def test_phase_filter_caps_and_train_split(env):
    records = training_data.read_samples(f"{env['data']}/samples.jsonl")
    for phase, allowed in ((1, {1}), (2, {1, 2}), (3, {1, 2, 3})):
        args = train.get_args(flags(env, "x", "--phase", phase))
        sel = train.select_phase(records, args, "samples.jsonl")
        assert {r["K"] for r in sel} == allowed and all(r["split"] == "train" for r in sel)
    # depth ablation: K = min(steps, 2)
    args = train.get_args(flags(env, "x", "--phase", 3, "--init", "none", "--max-k", 2))
    sel = train.select_phase(records, args, "samples.jsonl")
    assert {r["K"] for r in sel} == {1, 2} and any(r["latent_steps"] == 3 and r["K"] == 2 for r in sel)
    assert len(train.select_phase(records, train.get_args(flags(env, "x", "--limit", 5)), "s")) == 5
    # the ablation schedules of §4.3: which K each phase admits
    admitted = lambda cur, p: {r["K"] for r in train.select_phase(
        records, train.get_args(flags(env, "x", "--curriculum", cur, "--phase", p)), "s")}
    assert [admitted("2-phase", p) for p in (1, 2)] == [{1, 2}, {1, 2, 3}]
    assert [admitted("reverse", p) for p in (1, 2, 3)] == [{1, 2, 3}, {1, 2}, {1}]
    # stepwise: one more K per phase; a cap at or past the data's largest K (3 here) admits every item
    assert [admitted("stepwise", p) for p in range(1, 7)] == [{1}, {1, 2}] + [{1, 2, 3}] * 4
    def default_epochs(*extra):
        f = flags(env, "x", *extra)
        i = f.index("--epochs")
        return train.get_args(f[:i] + f[i + 2:]).epochs
    assert admitted("full-mix", 1) == {1, 2, 3} and default_epochs("--curriculum", "full-mix") == 20
    assert [default_epochs("--phase", p) for p in (1, 2, 3)] == [5, 5, 10]  # §4.1
    with pytest.raises(SystemExit):  # full-mix has one phase only
        train.get_args(flags(env, "x", "--curriculum", "full-mix", "--phase", 2))


def test_clear_errors(env, tmp_path):
    data = tmp_path / "d"
    rows = write_fixture(str(data), n_train=8)
    # malformed JSON line, reported with its line number
    lines = open(data / "samples.jsonl").read().splitlines()
    lines[2] = lines[2][:-5]
    (data / "samples.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(train.TrainError, match=r"samples.jsonl line 3: not valid JSON"):
        train.main(flags(env, tmp_path / "r", "--data", data))
    # a missing field, with its line and name
    lines[2] = json.dumps({k: v for k, v in rows[2].items() if k != "answer"})
    (data / "samples.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(train.TrainError, match=r"line 3: missing field 'answer'"):
        train.main(flags(env, tmp_path / "r", "--data", data))
    # choices whose answer_index points nowhere; an --options-rate that is no share
    lines[2] = json.dumps(dict(rows[2], choices=["yes.", "no."], answer_index=2))
    (data / "samples.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(train.TrainError, match=r"line 3: 'choices' needs a list of >= 2 strings and an"):
        train.main(flags(env, tmp_path / "r", "--data", data))
    with pytest.raises(SystemExit):
        train.get_args(flags(env, tmp_path / "r", "--options-rate", 1.5))
    write_fixture(str(data), n_train=8)
    # missing ROI features: every missing id listed
    feats = load_file(data / "roi.safetensors")
    keep = [r["id"] for r in rows if r["id"] not in ("s0", "s4")]
    save_file({k: v[[int(i[1:]) for i in keep]] for k, v in feats.items()}, data / "roi.safetensors",
              metadata={"ids": json.dumps(keep)})
    with pytest.raises(train.TrainError, match=r"2 training samples have no ROI feature: \['s0', 's4'\]"):
        train.main(flags(env, tmp_path / "r", "--data", data))
    # ... which --lambda-vis 0 does not need (the projector is not even built)
    train.main(flags(env, tmp_path / "r", "--data", data, "--lambda-vis", 0, "--max-steps", 1))
    assert not any(k.startswith("vp.") for k in weights(tmp_path / "r" / "phase1"))
    # an empty phase: no train sample with K = 1
    rows = [json.loads(l) for l in open(data / "samples.jsonl")]
    (data / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows if r["latent_steps"] != 1))
    with pytest.raises(train.TrainError, match=r"phase 1 .* has no train samples .*\{2: 2, 3: 2\}"):
        train.main(flags(env, tmp_path / "r", "--data", data))
    # a second fresh run into a folder that holds a checkpoint would overwrite it: refused
    write_fixture(str(data), n_train=8)
    with pytest.raises(train.TrainError, match=r"already holds a checkpoint: add --resume"):
        train.main(flags(env, tmp_path / "r", "--data", data, "--lambda-vis", 0))


# ---------------------------------------------------------------------------------------------- curriculum
def test_warm_start_loads_previous_phase_and_refuses_mismatch(env, tmp_path):
    out = tmp_path / "run"
    train.main(flags(env, out, "--phase", 1, "--max-steps", 3))
    cfg = json.load(open(out / "phase1" / "config.json"))
    assert cfg["data"]["n_train"] == 12 and cfg["step"] == 3  # phase 1 = the 12 train samples with K = 1
    # lr 0: phase 2 changes nothing, so its weights must be exactly what phase 1 saved
    train.main(flags(env, out, "--phase", 2, "--max-steps", 2, "--lr", 0))
    p1, p2 = weights(out / "phase1"), weights(out / "phase2")
    assert max_diff(p1, p2) == 0 and json.load(open(out / "phase2" / "config.json"))["data"]["n_train"] == 18
    assert any(v.abs().max() > 0 for k, v in p1.items() if k.endswith("lora_B"))  # phase 1 really trained
    # another LoRA shape, another backbone (same architecture, other weights), no phase 1 at all: refused
    with pytest.raises(train.TrainError, match=r"LoRA shape"):
        train.main(flags(env, tmp_path / "x", "--phase", 2, "--init", out / "phase1", "--lora-r", 8))
    other = make_tiny(str(tmp_path / "other"), seed=1)
    with pytest.raises(train.TrainError, match=r"trained with backbone \w+, this run uses \w+: refusing"):
        train.main(flags(env, tmp_path / "x", "--phase", 2, "--init", out / "phase1",
                         "--backbone", f"{other}/backbone"))
    with pytest.raises(train.TrainError, match=r"run --phase 1 first"):
        train.main(flags(env, tmp_path / "fresh", "--phase", 2))


def test_loss_falls(env, tmp_path):
    # Only LoRA trains in the backbone (its lm_head is frozen), so L_task falls less in 35 steps than
    # the fully trained decoder's L_sem: the bounds below differ for that reason.
    out = tmp_path / "run"
    train.main(flags(env, out, "--phase", 3, "--init", "none", "--epochs", 5, "--lr", 5e-3,
                     "--batch-size", 4))
    log = read_log(out)
    mean = lambda key, part: float(np.mean([e[key] for e in part]))
    assert len(log) == 35  # bounded: 5 epochs of 7 steps
    assert mean("L_task", log[-5:]) < mean("L_task", log[:3]) - 0.6, [round(e["L_task"], 2) for e in log]
    assert mean("L_sem", log[-5:]) < 0.6 * mean("L_sem", log[:3]), [round(e["L_sem"], 2) for e in log]
    assert all(k in log[-1]
               for k in ("L_vis", "lr", "grad_norm", "samples_per_s", "tokens_per_s", "peak_mem_mib"))


def test_nan_stops_and_keeps_last_good_checkpoint(env, tmp_path):
    out = tmp_path / "run"
    # lr 1e30: step 1 is still finite (Adam moves each weight by ~lr), step 2's loss is not.
    with pytest.raises(train.TrainError, match=r"non-finite loss or gradient at phase 1 step 2 .* last good "
                                               r"checkpoint: .*phase1 \(step 1\)"):
        train.main(flags(env, out, "--lr", 1e30, "--warmup", 0, "--save-every", 1))
    assert json.load(open(out / "phase1" / "config.json"))["step"] == 1 and len(read_log(out)) == 1
    # a resume with other training flags is refused (it could not match the uninterrupted run)
    with pytest.raises(train.TrainError, match=r"other flags: --lr 1e\+30 \(now 0.0001\)"):
        train.main(flags(env, out, "--resume", "--warmup", 0))


def test_depth_phase_runs_every_item_at_the_phase_k(env, tmp_path, monkeypatch):
    """Phase 2 of 3-phase admits chains of 1 and 2 steps. --depth phase: every micro-batch runs K = 2, a
    1-step item's second step has no sentence (all padding) and L_vis is told to count it anyway;
    --depth own: each batch runs its items' own K. The flag is recorded and a resume must match it."""
    import model as M
    from pipeline import io as IO
    seen, forward = [], M.VITAL.forward

    def spy(self, batch, K, per_step_target=False, vis_all_steps=False):
        seen.append((K, vis_all_steps, (batch["step_mask"].sum(-1) > 0).tolist()))  # (B, K) steps with text
        return forward(self, batch, K, per_step_target, vis_all_steps)
    monkeypatch.setattr(M.VITAL, "forward", spy)
    out = tmp_path / "phase"
    train.main(flags(env, out, "--phase", 2, "--init", "none", "--depth", "phase"))
    assert len(seen) == 9 and all(K == 2 and vis_all for K, vis_all, _ in seen)  # 18 items, batches of 2
    per_item = [tuple(v) for _, _, valid in seen for v in valid]
    assert per_item.count((True, False)) == 12 and per_item.count((True, True)) == 6
    assert json.load(open(out / "phase2" / "config.json"))["args"]["depth"] == "phase"
    with pytest.raises(train.TrainError, match=r"other flags: --depth phase \(now own\)"):
        train.main(flags(env, out, "--phase", 2, "--init", "none", "--resume"))
    seen.clear()
    assert train.get_args(["--data", env["data"], "--preset", "tiny", "--models", env["models"]]).depth == "phase"
    train.main(flags(env, tmp_path / "own", "--phase", 2, "--init", "none"))  # --depth own
    assert {K for K, _, _ in seen} == {1, 2} and not any(vis_all for _, vis_all, _ in seen)
    assert all(v == [True] * K for K, _, valid in seen for v in valid)  # no padded step: own K = chain


def test_loss_png(tmp_path):
    """The curve image from a synthetic log: two phases, a term that is 0 (not drawable on a log axis),
    a torn last line; the runs themselves are checked in test_three_phases_on_prepare_data_and_extract_roi."""
    rows = [dict(step=s, phase=p, L_task=2 / s, L_sem=3 / s, L_vis=0.0, loss=5 / s)
            for p in (1, 2) for s in range(1, 31)]
    (tmp_path / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 31, "ph')
    run_log.plot_losses(tmp_path / "log.jsonl", tmp_path / "loss.png", W=400, H=200)
    _check_loss_png(tmp_path / "loss.png", (400, 200), ("L_task", "L_sem", "loss"))


def _check_loss_png(path, size, keys):
    im = Image.open(path).convert("RGB")
    assert im.size == size
    # the plot area (inside the margins of plot_losses): not all background, each term's bold colour present
    plot = np.asarray(im)[30:size[1] - 30, 70:size[0] - 20].reshape(-1, 3)
    colours = {tuple(c) for c in np.unique(plot, axis=0)}
    assert len(colours) > 1 and all(run_log.LOSS_COLORS[k] in colours for k in keys), colours


# ---------------------------------------------------------------------------------------------- resume
def test_resume_after_max_steps_is_exact(env, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    train.main(flags(env, a, "--phase", 3, "--init", "none", "--grad-accum", 2))
    train.main(flags(env, b, "--phase", 3, "--init", "none", "--grad-accum", 2, "--max-steps", 2))
    assert json.load(open(b / "phase3" / "config.json"))["step"] == 2
    train.main(flags(env, b, "--phase", 3, "--init", "none", "--grad-accum", 2, "--resume"))
    assert max_diff(weights(a / "phase3"), weights(b / "phase3")) == 0  # bit-equal, dropout on
    la, lb = read_log(a), read_log(b)
    assert ([e["step"] for e in lb] == [e["step"] for e in la]
            and [e["loss"] for e in lb] == [e["loss"] for e in la])
    # finished: no Adam moments kept
    assert not os.path.exists(b / "phase3" / "trainer" / "state.safetensors")


def test_resume_after_real_kill_is_exact(env, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    f = flags(env, b, "--phase", 3, "--init", "none", "--epochs", 4, "--save-every", 2)
    proc = subprocess.Popen([sys.executable, f"{ROOT}/train.py", *f], env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    t0 = time.time()
    while time.time() - t0 < 120:
        if os.path.isfile(b / "log.jsonl") and len(read_log(b)) >= 5:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = len(read_log(b))
    total = 4 * 9  # 18 train samples, batches of 2 per K bucket: 9 steps per epoch
    assert 5 <= killed_at < total, killed_at  # it died mid-run, after at least one checkpoint
    train.main(flags(env, b, "--phase", 3, "--init", "none", "--epochs", 4, "--save-every", 2, "--resume"))
    train.main(flags(env, a, "--phase", 3, "--init", "none", "--epochs", 4, "--save-every", 2))
    assert max_diff(weights(a / "phase3"), weights(b / "phase3")) == 0
    assert [e["loss"] for e in read_log(a)] == [e["loss"] for e in read_log(b)]


# ---------------------------------------------------------------------------------------------- DDP
def test_two_ranks_equal_one_rank_with_double_accumulation(env, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    common = ("--phase", 3, "--init", "none", "--lora-dropout", 0, "--vp-dropout", 0, "--lr", 1e-3,
              "--epochs", 3)
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                        "--master_port=29517", f"{ROOT}/train.py",
                        *flags(env, two, *common, "--grad-accum", 2)],
                       env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    train.main(flags(env, one, *common, "--grad-accum", 4))
    c1, c2 = (json.load(open(d / "phase3" / "config.json")) for d in (one, two))
    assert (c1["global_batch"] == c2["global_batch"] == 8 and c2["world_size"] == 2
            and c1["step"] == c2["step"] == 9)
    w1, w2 = weights(one / "phase3"), weights(two / "phase3")
    print("DDP max abs weight diff", max_diff(w1, w2))
    assert max_diff(w1, w2) < 5e-6, max_diff(w1, w2)
    assert max(v.abs().max() for k, v in w1.items() if "lora_B" in k) > 1e-3  # it did train
    l1, l2 = read_log(one), read_log(two)  # all-reduced losses of both ranks == the one process's mean
    assert np.allclose([e["loss"] for e in l1], [e["loss"] for e in l2], atol=1e-5)


# ---------------------------------------------------------------------------------------------- end to end
def test_three_phases_on_prepare_data_and_extract_roi(env, tmp_path):
    data = tmp_path / "phantom"
    for cmd in (["prepare_data.py", "--source", "phantom", "--out", data, "--n", 24],
                ["extract_roi.py", "--samples", data / "samples.jsonl",
                 "--encoder", f"{env['models']}/encoder", "--out", data / "roi.safetensors"]):
        r = subprocess.run([sys.executable, f"{ROOT}/{cmd[0]}", *map(str, cmd[1:])], env=ENV,
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
    out, models = tmp_path / "run", tmp_path / "tiny"
    for p in (1, 2, 3):  # --preset tiny makes its models at phase 1 (absent), then reuses them
        train.main(["--data", str(data), "--preset", "tiny", "--models", str(models), "--out", str(out),
                    "--phase", str(p), "--max-steps", "2", "--batch-size", "2"])
        assert os.path.isfile(models / "backbone" / "config.json")
        cfg = json.load(open(out / f"phase{p}" / "config.json"))
        assert cfg["step"] == 2 and cfg["init"] == (str(out / f"phase{p - 1}") if p > 1 else None)
    assert [e["phase"] for e in read_log(out)] == [1, 1, 2, 2, 3, 3]
    _check_loss_png(out / "loss.png", (800, 400), ("L_task", "L_sem", "L_vis", "loss"))  # all 3 phases
    # L_vis beside what an item-blind projector scores, and how well VP(h_k) points (issue 25)
    floor = cfg["lvis_baselines"]
    assert 0 < floor["mean"] < floor["zero"] and -1 <= floor["mean_cos"] <= 1
    assert all(-1 <= e["cos_vis"] <= 1 and e["cos_vis"] != 0 for e in read_log(out))


def test_lvis_baselines_by_hand():
    """Targets [1, 0] and [0, 1]: |t| averages 0.5, their mean [.5, .5] is 0.5 from each, at cosine 1/sqrt(2)."""
    b = run_log.lvis_baselines(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    assert b["zero"] == 0.5 and b["mean"] == 0.5 and abs(b["mean_cos"] - 2 ** -0.5) < 1e-6
    b = run_log.lvis_baselines(torch.tensor([[0.6, 0.8], [0.8, 0.6]]))  # mean [.7, .7]: L1 0.1 < zero's 0.7
    assert abs(b["zero"] - 0.7) < 1e-6 and abs(b["mean"] - 0.1) < 1e-6


def test_two_rank_resume_is_exact_with_dropout(env, tmp_path):
    # Each rank's own RNG stream (dropout on) is gathered into the checkpoint and handed back to that rank.
    common = ("--phase", 3, "--init", "none", "--grad-accum", 2, "--epochs", 2)
    run = lambda out, *extra: subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29518",
         f"{ROOT}/train.py", *flags(env, out, *common, *extra)],
        env=ENV, capture_output=True, text=True, timeout=300)
    for out, extra in ((tmp_path / "a", ()), (tmp_path / "b", ("--max-steps", 4)),
                       (tmp_path / "b", ("--resume",))):
        r = run(out, *extra)
        assert r.returncode == 0, r.stderr[-3000:]
    assert json.load(open(tmp_path / "b" / "phase3" / "config.json"))["world_size"] == 2
    assert max_diff(weights(tmp_path / "a" / "phase3"), weights(tmp_path / "b" / "phase3")) == 0
    assert [e["loss"] for e in read_log(tmp_path / "a")] == [e["loss"] for e in read_log(tmp_path / "b")]


# --------------------------------------------------------------------------- demo/pretrain.py (tiny only)
def test_pretrain_trains_whole_backbone_resumes_exactly_and_feeds_vital(env, tmp_path):
    from demo import pretrain
    from pipeline.io import load_backbone
    import evaluate
    pre = lambda out, *extra: ["--data", env["data"], "--models", env["models"], "--out", str(out),
                               "--batch-size", "4", "--epochs", "2", "--lr", "1e-3", *map(str, extra)]
    a, b = tmp_path / "a", tmp_path / "b"
    pretrain.main(pre(a))
    pretrain.main(pre(b, "--max-steps", 3, "--save-every", 1))
    pretrain.main(pre(b, "--resume"))
    wa, wb = (load_file(f"{d}/phase1/backbone/model.safetensors") for d in (a, b))
    w0 = load_file(f"{env['models']}/backbone/model.safetensors")
    assert max_diff(wa, wb) == 0  # a resume continues from the saved backbone, bit-exact
    # every part changed: vision tower, merger, LLM layers, embeddings and head (no LoRA anywhere)
    for part in ("visual.patch_embed", "visual.merger", "language_model.layers.0", "embed_tokens", "lm_head"):
        assert any(part in k and (wa[k] - w0[k]).abs().max() > 0 for k in wa), part
    assert load_file(f"{a}/phase1/adapter.safetensors") == {}
    # the folder is a from_pretrained backbone; evaluate.py reads a pretrain checkpoint as that backbone alone
    load_backbone(f"{a}/phase1/backbone")
    _, _, _, report = evaluate.load_inference_model(str(a / "phase1"))
    assert report["backbone"] == os.path.join(str(a / "phase1"), "backbone") and report["extra_params"] == 0
    # VITAL trains LoRA on top of it and records it as its backbone
    v = tmp_path / "vital"
    train.main(flags(env, v, "--backbone", f"{a}/phase1/backbone", "--max-steps", 2))
    assert (json.load(open(v / "phase1" / "config.json"))["backbone_path"]
            == os.path.abspath(f"{a}/phase1/backbone"))
    with pytest.raises(SystemExit):  # train.py itself has no way to train the whole backbone
        train.get_args(["--pretrain", "--data", env["data"], "--backbone", "x", "--decoder", "y"])


# ---------------------------------------------------------------------------------------------- memory
def test_grad_ckpt_trains_the_same_weights_and_resumes_without_it(env, tmp_path):
    """--grad-ckpt changes memory, not results (dropout on): 3 steps with it, or 2 with it and a resume
    without it, give the weights of 3 steps without it."""
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    common = ("--phase", 3, "--init", "none", "--max-steps", 3)
    train.main(flags(env, a, *common))
    train.main(flags(env, b, *common, "--grad-ckpt"))
    assert max_diff(weights(a / "phase3"), weights(b / "phase3")) <= 1e-6
    train.main(flags(env, c, "--phase", 3, "--init", "none", "--max-steps", 2, "--grad-ckpt"))
    train.main(flags(env, c, *common, "--resume"))
    assert max_diff(weights(a / "phase3"), weights(c / "phase3")) <= 1e-6
    assert json.load(open(b / "phase3" / "config.json"))["args"]["grad_ckpt"] is True


def test_sampler_groups_by_k_and_image_length():
    ks = [1] * 10 + [2] * 6
    lengths = [196, 64] * 5 + [196, 196, 1024, 1024, 64, 64]  # visual tokens of each sample's image
    s = train.KBucketSampler(ks, batch_size=2, split=train.Split(accum=1), seed=0, lengths=lengths)
    batches = list(s)
    assert s.n_groups == 5 and {i for b in batches for i in b} == set(range(len(ks)))
    for b in batches:  # one K and one length group per micro-batch: no large image pads small ones
        assert len({ks[i] for i in b}) == 1 and len({train.length_group(lengths[i]) for i in b}) == 1
    assert train.length_group(196) == train.length_group(200) != train.length_group(256)
    # one image size (the demo's phantoms): exactly the batches of the K-only sampler, epoch after epoch
    same = train.KBucketSampler(ks, 2, seed=0, lengths=[9] * len(ks))
    plain = train.KBucketSampler(ks, 2, seed=0)
    for epoch in range(3):
        same.set_epoch(epoch), plain.set_epoch(epoch)
        assert list(same) == list(plain)


def test_plan_fits_the_papers_setting_and_matches_the_h200(capsys):
    """train.py --plan at the defaults (6 GPUs, batch 8, 448-px cap, no checkpointing) leaves >= 10% of an
    80 GB H100 in every phase of the curriculum (K up to 4); without the pixel cap it does not fit; the model
    is within 10% of the H200 run's measured peaks."""
    res = train.main(["--plan", "--phase", "3"])
    out = capsys.readouterr().out
    assert "fits (>= 10% headroom)" in out and "DDP buckets" in out
    assert [p["K"] for p in res["phases"]] == [1, 2, 4] and min(p["headroom"] for p in res["phases"]) >= 0.10
    assert all(abs(r["model"] - r["measured"]) <= 0.10 * r["measured"] for r in res["h200"])
    assert train.main(["--plan", "--phase", "3", "--max-pixels", "0"])["headroom"] < 0.10
    ckpt = train.main(["--plan", "--phase", "3", "--grad-ckpt"])
    assert ckpt["total"] < res["total"] - 10  # GiB


def test_memory_model_matches_measured_cpu_peaks():
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    import memory
    rows = memory.main(["--quick"])
    assert all(abs(r["error"]) <= 0.25 for r in rows), [(r["name"], r["error"]) for r in rows]
