"""The answer's read-out of h_K (model.latent_loop, train.py --readout). "head" is eq. 2: lm_head(h_K) predicts the
first answer token and h_K never enters the cache. "cache" also writes h_K into the cache as one more position, so
every answer token can attend to it. Checked against one non-cached forward, against greedy decoding and the static
cache, and through train.py -> config.json -> evaluate.py / explain.py."""
import json
import os

import pytest
import torch

import evaluate as E
import model as M
import train
from embedded.tiny import make_tiny
from pipeline import fast_inference as FI
from pipeline import io as IO
from pipeline import scaffolds as SC
from tests.test_model import ANSWERS, QUESTIONS, TOL, _backbone, _images, full_forward
from tests.test_bf16 import write_data
from tests.test_train import flags

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return str(make_tiny(str(tmp_path_factory.mktemp("tiny"))))


@pytest.mark.parametrize("K", [1, 3])
def test_cache_readout_is_one_full_forward_with_h_K_as_one_more_input(tiny, K):
    bb, proc = _backbone(tiny)
    prefix = IO.build_prefix(proc, _images(), QUESTIONS)  # a left-padded batch
    ans, amask = IO.tokenize_answers(proc.tokenizer, ANSWERS)
    with torch.no_grad():
        st = M.latent_loop(bb, prefix, K, readout="cache")
        logits = M.answer_logits(bb, st, ans, amask)
        h = torch.cat(st.h, 1)                                          # (B, K+1, d): h_0..h_K
        h_full, logits_full = full_forward(bb, prefix, h, ans, amask)  # inputs [prefix, h_0, .., h_K, answer]
        head = M.answer_logits(bb, M.latent_loop(bb, prefix, K), ans, amask)
    valid = amask.bool()[:, 1:]
    assert (h - h_full[:, :K + 1]).abs().max() <= TOL                 # the loop itself is unchanged
    assert (logits[:, 0] - bb.lm_head(h[:, -1])).abs().max() <= TOL   # token 0: still lm_head(h_K)
    assert (logits[:, 1:] - logits_full[:, 1:])[valid].abs().max() <= TOL  # later tokens attend to h_K
    assert (logits[:, 0] - head[:, 0]).abs().max() <= TOL
    assert (logits[:, 1:] - head[:, 1:])[valid].abs().max() > 1e-4    # ... which eq. 2's tokens do not


def test_k0_has_nothing_to_read_out(tiny):
    bb, proc = _backbone(tiny)
    prefix = IO.build_prefix(proc, _images(), QUESTIONS)
    with torch.no_grad():
        a, b = M.latent_loop(bb, prefix, 0, readout="cache"), M.latent_loop(bb, prefix, 0)
    assert a.mask.shape == b.mask.shape and torch.equal(a.next_pos, b.next_pos)
    with pytest.raises(ValueError, match="readout"):
        M.latent_loop(bb, prefix, 1, readout="lm_head")


@pytest.mark.parametrize("K", [1, 3])
def test_cache_readout_greedy_matches_teacher_forced_and_the_static_cache(tiny, K):
    bb, proc = _backbone(tiny)
    M.set_lora_merged(bb, True)
    prefix = IO.build_prefix(proc, _images(), QUESTIONS)
    toks, st = M.generate(bb, prefix, K, eos_id=-1, max_new_tokens=6, readout="cache")  # 6 tokens each
    with torch.no_grad():
        logits = M.answer_logits(bb, M.latent_loop(bb, prefix, K, readout="cache"), toks, torch.ones_like(toks))
    assert torch.equal(logits.argmax(-1), toks)
    fast, fst = FI.fast_generate(bb, prefix, K, -1, 6, static=True, readout="cache")  # what a GPU runs
    assert torch.equal(fast, toks)
    assert fst.mask.shape[1] == prefix["input_ids"].shape[1] + K + 1 + 6 and torch.equal(fst.next_pos, st.next_pos)
    assert torch.equal(FI.fast_generate(bb, prefix, K, -1, 6, readout="cache")[0], toks)  # the CPU default


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("readout")
    env = dict(models=make_tiny(str(base / "models")), data=str(base / "data"))
    d_v = json.load(open(os.path.join(env["models"], "encoder", "config.json")))["hidden_size"]
    write_data(env["data"], d_v, 64)  # test rows with choices, as evaluate.py reads them
    train.main(flags(env, base / "cache", "--phase", 3, "--init", "none", "--max-k", 2,
                          "--readout", "cache"))
    return env, base


def test_the_checkpoint_carries_its_readout_to_evaluate_and_explain(runs):
    env, base = runs
    ckpt = str(base / "cache" / "phase3")
    config = json.load(open(os.path.join(ckpt, "config.json")))
    assert config["args"]["readout"] == config["arch"]["readout"] == "cache" and IO.readout_of(config) == "cache"
    assert IO.readout_of({"args": {}}) == "head"  # a checkpoint from before the flag ran eq. 2
    out = str(base / "eval")
    E.main(["--ckpt", ckpt, "--data", env["data"], "--out", out, "--k", "2", "--max-new-tokens", "4"])
    assert json.load(open(os.path.join(out, "metrics.json")))["readout"] == "cache"
    preds = [json.loads(l) for l in open(os.path.join(out, "predictions.jsonl"))]
    backbone, processor, _, _ = E.load_inference_model(ckpt)
    eos = processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    items = {it["id"]: it for it in E.read_test_split(env["data"])}  # the prompts evaluate.py asked
    for p in preds[:2]:
        prefix = IO.build_prefix(processor, [IO.load_image(p["image"])], [items[p["id"]]["prompt"]])
        said = {ro: processor.tokenizer.batch_decode(M.generate(backbone, prefix, 2, eos, 4, readout=ro)[0],
                                                     skip_special_tokens=True)[0].strip() for ro in M.READOUTS}
        assert p["prediction"] == said["cache"] != said["head"]
    vital, *_ = SC.load_explainer(ckpt, "cpu", torch.float32, IO.InputError)  # explain.py's loader
    assert vital.readout == "cache"


def test_no_warm_start_across_readouts(runs):
    env, base = runs
    with pytest.raises(train.TrainError, match="--readout"):
        train.main(flags(env, base / "mixed", "--phase", 3, "--max-k", 2, "--init", str(base / "cache" / "phase3")))
