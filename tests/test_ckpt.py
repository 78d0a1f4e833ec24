"""Activation checkpointing with the latent loop (model.set_checkpointing, train.py --grad-ckpt), on CPU
with the tiny models in fp32: the same loss and gradients as without it, the cache left exactly as the
plain loop leaves it, saved activations reduced >= 3x (bench/ckpt.py), and the two traps it avoids shown
to be real."""
import functools
import os
import sys

import pytest
import torch
from torch.utils.checkpoint import checkpoint

import model as M

from pipeline import activation_checkpointing as AC
from embedded.tiny import make_tiny

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
import ckpt as bench_ckpt  # noqa: E402
from test_model import _batch, _vital  # noqa: E402

K = 4


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return str(make_tiny(str(tmp_path_factory.mktemp("tiny"))))


pytestmark = pytest.mark.usefixtures("one_thread")


def _step(vital, batch, ckpt, seed=0):
    """Forward + backward of the joint loss (dropout on) -> (loss, {trainable name: gradient})."""
    AC.set_checkpointing(vital, ckpt)
    vital.zero_grad(set_to_none=True)
    torch.manual_seed(seed)  # the same LoRA / projector dropout masks both ways
    out = vital(batch, K)
    out["loss"].backward()
    AC.set_checkpointing(vital, False)
    return out["loss"].detach(), {n: p.grad.clone() for n, p in vital.named_parameters() if p.requires_grad}


def test_checkpointed_gradients_equal_the_plain_run(tiny):
    vital, proc, dtok = _vital(tiny)
    vital.train()  # dropout on: the replay must draw the same masks
    batch = _batch(proc, dtok, K)  # two images of different sizes: a left-padded batch; padded steps too
    assert (batch["prefix"]["attention_mask"] == 0).any()
    loss0, g0 = _step(vital, batch, ckpt=False)
    loss1, g1 = _step(vital, batch, ckpt=True)
    n_lora = sum(1 for n in g0 if ".lora_" in n)
    assert n_lora == 7 * 2 * 2 and any(n.startswith("decoder.") for n in g0) and "pj_in.weight" in g0
    assert g0.keys() == g1.keys() and all(g.abs().sum() > 0 for g in g0.values())
    assert abs(loss0.item() - loss1.item()) <= 1e-6
    diff = max((g0[n] - g1[n]).abs().max().item() for n in g0)
    assert diff <= 1e-5, f"max |gradient difference| {diff:.2e}"


def test_the_cache_is_the_plain_loops_cache_and_nothing_is_appended_twice(tiny):
    vital, proc, dtok = _vital(tiny)
    vital.eval()
    batch = _batch(proc, dtok, K)
    bb = vital.backbone

    def run(ckpt):
        AC.set_checkpointing(vital, ckpt)
        st = M.latent_loop(bb, batch["prefix"], K)
        logits = M.answer_logits(bb, st, batch["answer_ids"], batch["answer_mask"])
        AC.set_checkpointing(vital, False)
        return st, logits

    plain, lp = run(False)
    ck, lc = run(True)
    P, T = batch["prefix"]["input_ids"].shape[1], batch["answer_ids"].shape[1]
    assert hasattr(ck.cache, "ckpt_chunks") and not hasattr(plain.cache, "ckpt_chunks")
    for i in range(bb.config.text_config.num_hidden_layers):
        a, b = plain.cache.layers[i], ck.cache.layers[i]
        assert b.keys.shape[-2] == P + K + T
        assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)
        assert len(ck.cache.ckpt_chunks[i][0]) == 1 + K + 1  # prefix, K latent steps, the answer
    lc.sum().backward()  # the backward replays every layer: the cache must not grow
    assert all(ck.cache.layers[i].keys.shape[-2] == P + K + T for i in range(len(ck.cache.layers)))
    assert torch.equal(lp, lc)
    # inference (no gradient) goes straight through: generate is unchanged with the switch on
    eos = proc.tokenizer.convert_tokens_to_ids("<|im_end|>")
    ref, _ = M.generate(bb, batch["prefix"], K, eos, max_new_tokens=5)
    AC.set_checkpointing(vital, True)
    got, _ = M.generate(bb, batch["prefix"], K, eos, max_new_tokens=5)
    AC.set_checkpointing(vital, False)
    assert torch.equal(ref, got)
    assert not any("forward" in layer.__dict__ for layer in bb.model.language_model.layers)


def test_the_two_traps_are_real(tiny):
    """Why the cache is handled outside the replay: a checkpoint around the layer with the live cache inside
    replays its append on a cache that has grown since (shape error or wrong values), and transformers' own
    checkpointing runs every layer with cache=None (a different loss: the steps attend to nothing)."""
    vital, proc, dtok = _vital(tiny)
    vital.eval()
    batch = _batch(proc, dtok, K)
    bb = vital.backbone
    with torch.no_grad():
        ref = vital(batch, K)["loss"]

    def naive(forward, h, *args, **kwargs):
        return checkpoint(lambda x: forward(x, *args, **kwargs), h, use_reentrant=False)

    for layer in bb.model.language_model.layers:
        layer.forward = functools.partial(naive, type(layer).forward.__get__(layer))
    try:
        with pytest.raises(Exception):
            vital(batch, K)["loss"].backward()
    finally:
        for layer in bb.model.language_model.layers:
            layer.__dict__.pop("forward")
    bb.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    vital.train()
    for m in vital.modules():  # no dropout: only the checkpointing differs
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    try:
        hf = vital(batch, K)["loss"]
    finally:
        bb.activation_checkpointing_disable()
    assert abs(hf.item() - ref.item()) > 1e-3


def test_bench_saved_activations_reduced_at_least_3x():
    res = bench_ckpt.main(["--batch", "2", "--K", str(K)])
    assert res["grad_max_diff"] <= 1e-5 and res["loss_off"] == res["loss_on"]
    assert res["ratio"] >= 3.0, f"saved activations reduced only {res['ratio']:.2f}x"
