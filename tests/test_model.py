"""Invariants of model.py on tiny models of the real transformers classes (CPU, fp32)."""
import copy
import json
import os

import numpy as np
import pytest
import torch
import transformers
import torch.nn.functional as F
from PIL import Image

import model as M

from pipeline import io as IO
from embedded.tiny import make_tiny, real_configs

TOL = 1e-5


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return str(make_tiny(str(tmp_path_factory.mktemp("tiny"))))


def _images(seed=0):
    rng = np.random.default_rng(seed)
    # Two different image sizes -> different numbers of visual tokens -> a genuinely LEFT-padded batch.
    return [Image.fromarray((rng.random((64, 64, 3)) * 255).astype("uint8")),
            Image.fromarray((rng.random((96, 128, 3)) * 255).astype("uint8"))]


QUESTIONS = ["Is the liver visible?", "Where is the tumor located in this image?"]
ANSWERS = ["Yes.", "It is in the upper left part of the image."]
CHAINS = [["The liver is bright."],
          ["A dark round region is present.", "It lies in the upper left.", "Edges are sharp."]]


def _backbone(tiny, r=8, randomize=True, seed=0):
    bb, proc = IO.load_backbone(os.path.join(tiny, "backbone"))
    M.add_lora(bb, r=r, alpha=2 * r, dropout=0.05)
    if randomize:  # B = 0 at init; give it values so that LoRA actually changes the function
        g = torch.Generator().manual_seed(seed)
        for m in M.lora_layers(bb):
            m.lora_B.data = torch.randn(m.lora_B.shape, generator=g) * 0.05
    return bb.eval(), proc


def _vital(tiny, seed=0, **kw):
    torch.manual_seed(seed)
    bb, proc = _backbone(tiny, seed=seed)
    dec, dtok = IO.load_decoder(os.path.join(tiny, "decoder"))
    torch.manual_seed(seed)
    return M.VITAL(bb, dec, d_v=48, **kw), proc, dtok


def _batch(proc, dtok, K, n=2, roi_seed=0):
    roi = F.normalize(torch.randn(n, 48, generator=torch.Generator().manual_seed(roi_seed)), dim=-1)
    return IO.make_batch(proc, dtok, _images()[:n], QUESTIONS[:n], ANSWERS[:n], CHAINS[:n], K, roi=roi)


def full_forward(bb, prefix, h_in, answer_ids, answer_mask):
    """Oracle: ONE non-cached forward over [prefix embeds, h_0..h_{K-1}, answer embeds] with the same
    M-RoPE positions the loop uses. Returns (hidden at the K+1 latent slots, answer logits)."""
    inner = bb.model
    ids = prefix["input_ids"]
    emb = inner.get_input_embeddings()(ids)
    img = inner.get_image_features(prefix["pixel_values"], prefix["image_grid_thw"], return_dict=True)
    vis = ids == bb.config.image_token_id
    emb = emb.masked_scatter(vis[..., None].expand_as(emb), torch.cat(img.pooler_output, 0))
    pos, delta = inner.get_rope_index(ids, prefix["mm_token_type_ids"],
                                      image_grid_thw=prefix["image_grid_thw"],
                                      attention_mask=prefix["attention_mask"])
    B, P = ids.shape
    K, T = h_in.shape[1], answer_ids.shape[1]
    start = prefix["attention_mask"].sum(-1) + delta[:, 0]
    new_pos = (start[:, None] + torch.arange(K + T))[None].expand(3, B, K + T)
    out = inner.language_model(
        inputs_embeds=torch.cat([emb, h_in, inner.get_input_embeddings()(answer_ids)], 1),
        attention_mask=torch.cat([prefix["attention_mask"], torch.ones(B, K, dtype=torch.long),
                                  answer_mask], 1),
        position_ids=torch.cat([pos, new_pos], 2),
        visual_pos_masks=torch.cat([vis, torch.zeros(B, K + T, dtype=torch.bool)], 1),
        deepstack_visual_embeds=[torch.cat(f, 0) for f in img.deepstack_features])
    hid = out.last_hidden_state
    return hid[:, P - 1:P + K], bb.lm_head(hid[:, P - 1 + K:P - 1 + K + T])


# ---------------------------------------------------------------- the loop
@pytest.mark.parametrize("K", [0, 1, 4])
def test_cached_loop_equals_one_full_forward(tiny, K):
    bb, proc = _backbone(tiny)
    prefix = IO.build_prefix(proc, _images(), QUESTIONS)
    assert (prefix["attention_mask"] == 0).any(), (
        "the batch must be left-padded for this test to mean anything")
    ans, amask = IO.tokenize_answers(proc.tokenizer, ANSWERS)
    with torch.no_grad():
        st = M.latent_loop(bb, prefix, K)
        logits = M.answer_logits(bb, st, ans, amask)
        h = torch.cat(st.h, 1)                                          # (B, K+1, d): h_0..h_K
        h_full, logits_full = full_forward(bb, prefix, h[:, :K], ans, amask)
    assert (h - h_full).abs().max() <= TOL
    valid = amask.bool()
    assert (logits - logits_full)[valid].abs().max() <= TOL


def test_sample_alone_equals_sample_in_padded_batch(tiny):
    bb, proc = _backbone(tiny)
    ans, amask = IO.tokenize_answers(proc.tokenizer, ANSWERS)
    with torch.no_grad():
        both = M.latent_loop(bb, IO.build_prefix(proc, _images(), QUESTIONS), 3)
        lb = M.answer_logits(bb, both, ans, amask)
        for i in range(2):
            one = M.latent_loop(bb, IO.build_prefix(proc, _images()[i:i + 1], QUESTIONS[i:i + 1]), 3)
            a1, m1 = IO.tokenize_answers(proc.tokenizer, ANSWERS[i:i + 1])
            l1 = M.answer_logits(bb, one, a1, m1)
            assert (torch.cat(one.h, 1)[0] - torch.cat(both.h, 1)[i]).abs().max() <= TOL
            n = int(m1.sum())
            assert (l1[0, :n] - lb[i, :n]).abs().max() <= TOL


def test_k0_greedy_answer_equals_transformers_generate(tiny):
    bb, proc = _backbone(tiny)
    prefix = IO.build_prefix(proc, _images(), QUESTIONS)
    eos = proc.tokenizer.convert_tokens_to_ids("<|im_end|>")
    ours, _ = M.generate(bb, prefix, K=0, eos_id=eos, max_new_tokens=10)
    ref = bb.generate(**prefix, max_new_tokens=10, do_sample=False, eos_token_id=eos,
                      pad_token_id=proc.tokenizer.pad_token_id)[:, prefix["input_ids"].shape[1]:]
    for i in range(2):  # compare up to and including the first eos
        r = ref[i].tolist()
        n = r.index(eos) + 1 if eos in r else len(r)
        assert ours[i, :n].tolist() == r[:n]


def test_generate_k_matches_teacher_forced_argmax(tiny):
    """Greedy answers after K steps agree with the teacher-forced logits of the same loop
    fed its own tokens."""
    bb, proc = _backbone(tiny)
    prefix = IO.build_prefix(proc, _images(), QUESTIONS)
    toks, _ = M.generate(bb, prefix, K=2, eos_id=-1, max_new_tokens=6)  # eos never hit: 6 tokens each
    with torch.no_grad():
        logits = M.answer_logits(bb, M.latent_loop(bb, prefix, 2), toks, torch.ones_like(toks))
    assert torch.equal(logits.argmax(-1), toks)


# ---------------------------------------------------------------- LoRA
def test_lora_init_equals_base_and_only_lora_trains(tiny):
    base, proc = IO.load_backbone(os.path.join(tiny, "backbone"))
    bb, _ = _backbone(tiny, randomize=False)
    cfg = base.config.text_config
    assert len(M.lora_layers(bb)) == 7 * cfg.num_hidden_layers
    assert not any(isinstance(m, M.LoRALinear)
                   for m in bb.model.visual.modules()), "vision tower must stay plain"
    trainable = [n for n, p in bb.named_parameters() if p.requires_grad]
    assert trainable and all(n.endswith((".lora_A", ".lora_B")) for n in trainable)
    prefix = IO.build_prefix(proc, _images(), QUESTIONS)
    with torch.no_grad():
        a, b = M.prefix_forward(base, prefix).h[0], M.prefix_forward(bb, prefix).h[0]
    assert torch.equal(a, b)


def test_lora_merged_equals_unmerged(tiny):
    bb, proc = _backbone(tiny)
    prefix = IO.build_prefix(proc, _images(), QUESTIONS)
    with torch.no_grad():
        un = torch.cat(M.latent_loop(bb, prefix, 2).h, 1)
        M.set_lora_merged(bb, True)
        assert all(m.merged for m in M.lora_layers(bb))
        me = torch.cat(M.latent_loop(bb, prefix, 2).h, 1)
        with pytest.raises(RuntimeError):
            M.lora_layers(bb)[0].merge()
        M.set_lora_merged(bb, False)
        back = torch.cat(M.latent_loop(bb, prefix, 2).h, 1)
    assert (un - me).abs().max() <= TOL
    assert (un - back).abs().max() <= TOL
    plain, _ = IO.load_backbone(os.path.join(tiny, "backbone"))
    M.fold_lora(bb)   # deployment: the plain module structure, W + sBA inside
    assert not M.lora_layers(bb) and IO.count_params(bb) == IO.count_params(plain)
    with torch.no_grad():
        folded = torch.cat(M.latent_loop(bb, prefix, 2).h, 1)
    assert (un - folded).abs().max() <= TOL


def test_real_size_parameter_counts_match_the_paper():
    """embedded/tiny.py's real_configs are the real shapes: Qwen3-VL-8B has 8,767,123,696 parameters; §B.2
    Table 10: LoRA r=64 = 174.6M, VP = 21.51M, pj_in = 8.39M (all built on 'meta': no memory)."""
    cfg, dcfg, ecfg, _ = real_configs()
    with torch.device("meta"):
        bb = transformers.Qwen3VLForConditionalGeneration(cfg)
        n_plain = IO.count_params(bb)
        M.add_lora(bb, r=64, alpha=128)
        vp = M.VisualProjector(cfg.text_config.hidden_size, ecfg.hidden_size)
        pj_in = torch.nn.Linear(cfg.text_config.hidden_size, dcfg.hidden_size)
    assert n_plain == 8_767_123_696
    n_lora = sum(p.numel() for n, p in bb.named_parameters() if ".lora_" in n)
    assert round(n_lora / 1e6, 1) == 174.6
    assert round(IO.count_params(vp) / 1e6, 2) == 21.51
    assert round(IO.count_params(pj_in) / 1e6, 2) == 8.39


# ---------------------------------------------------------------- losses and gradients
def test_every_trainable_tensor_gets_gradient_and_the_recurrence_is_in_the_graph(tiny):
    vital, proc, dtok = _vital(tiny)
    vital.eval()  # no dropout: the two runs below must differ only by the detach
    batch = _batch(proc, dtok, K=3)
    out = vital(batch, K=3)
    assert all(torch.isfinite(out[k]) and out[k] > 0 for k in ("L_task", "L_sem", "L_vis"))
    out["loss"].backward()
    for n, p in vital.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, f"no gradient reaches {n}"
    g_full = {n: p.grad.clone() for n, p in vital.named_parameters() if ".lora_" in n}
    vital.zero_grad()

    real_loop = M.latent_loop

    def detached_loop(backbone, prefix, K, feed=None, readout="head"):  # the same loop, h_{k-1} cut from the graph
        st = M.prefix_forward(backbone, prefix)
        for _ in range(K):
            st.h.append(M._text_step(backbone, st.h[-1].detach(), st))
        return st

    M.latent_loop = detached_loop
    try:
        vital(batch, K=3)["loss"].backward()
    finally:
        M.latent_loop = real_loop
    diff = max((g_full[n] - p.grad).abs().max().item() for n, p in vital.named_parameters() if ".lora_" in n)
    assert diff > 1e-6, "detaching the fed-back state did not change any gradient"


def test_padding_never_counts_and_decoder_runs_once(tiny):
    vital, proc, dtok = _vital(tiny)
    vital.eval()
    calls = []
    vital.decoder.register_forward_hook(lambda *a: calls.append(1))
    batch = _batch(proc, dtok, K=3)   # sample 0 has 1 step of 3, shorter answer: lots of padding
    with torch.no_grad():
        ref = vital(batch, K=3)
        assert len(calls) == 1, "all B x K steps must go through the decoder in one call"
        poked = dict(batch)
        poked["answer_ids"] = batch["answer_ids"].masked_fill(batch["answer_mask"] == 0, 7)
        poked["step_ids"] = batch["step_ids"].masked_fill(batch["step_mask"] == 0, 9)
        # extra padding columns on answers and steps change nothing either
        poked["answer_ids"] = F.pad(poked["answer_ids"], (0, 3), value=11)
        poked["answer_mask"] = F.pad(batch["answer_mask"], (0, 3))
        poked["step_ids"] = F.pad(poked["step_ids"], (0, 2), value=13)
        poked["step_mask"] = F.pad(batch["step_mask"], (0, 2))
        out = vital(poked, K=3)
    for k in ("L_task", "L_sem", "L_vis"):
        assert abs(out[k].item() - ref[k].item()) <= TOL, k


def test_l_sem_is_the_mean_over_valid_steps(tiny):
    """Sample 0 has one valid step of three: L_sem averages 4 valid steps, not 6."""
    vital, proc, dtok = _vital(tiny)
    vital.eval()
    batch = _batch(proc, dtok, K=3)
    with torch.no_grad():
        h = vital(batch, K=3)["h"]
        per = []
        for i, chain in enumerate(CHAINS):
            for k, sent in enumerate(chain):
                ids = dtok(sent, add_special_tokens=False)["input_ids"] + [dtok.eos_token_id]
                x = torch.cat([vital.pj_in(h[i, k])[None, None],
                               vital.decoder.get_input_embeddings()(torch.tensor([ids[:-1]]))], 1)
                per.append(F.cross_entropy(vital.decoder(inputs_embeds=x).logits[0], torch.tensor(ids)))
        got = M.decoder_loss(vital.decoder, vital.pj_in, h, batch["step_ids"], batch["step_mask"])
    assert len(per) == 4 and abs(got.item() - torch.stack(per).mean().item()) <= TOL


def test_l_vis_counts_padded_steps_only_when_asked(tiny):
    """train.py --depth phase: sample 0's chain has 1 sentence, the batch runs K = 2, so its step 2 has no
    sentence. L_sem (eq. 4) averages the 3 valid steps either way; L_vis (eq. 6, one shared v_roi) averages
    those 3 by default and all 4 with vis_all_steps=True. Manual L1 of VP(h_k) against v_roi."""
    vital, proc, dtok = _vital(tiny)
    vital.eval()  # no dropout in VP: the manual projection below sees the same function
    batch = _batch(proc, dtok, K=2)
    assert batch["step_mask"].sum(-1).gt(0).tolist() == [[True, False], [True, True]]
    with torch.no_grad():
        own, every = vital(batch, K=2), vital(batch, K=2, vis_all_steps=True)
        l1 = (vital.vp(every["h"]) - batch["roi"][:, None]).abs().mean(-1)                 # (B, K)
        sem = M.decoder_loss(vital.decoder, vital.pj_in, every["h"], batch["step_ids"], batch["step_mask"])
    assert abs(every["L_vis"].item() - l1.mean().item()) <= TOL
    assert abs(own["L_vis"].item() - (l1.sum() - l1[0, 1]).item() / 3) <= TOL
    assert abs(own["L_vis"].item() - every["L_vis"].item()) > 1e-4  # the padded step really counts
    for out in (own, every):  # L_sem and L_task do not depend on the switch
        assert abs(out["L_sem"].item() - sem.item()) <= TOL and out["L_task"].item() == own["L_task"].item()
        assert abs(out["loss"] - (out["L_task"] + out["L_sem"] + 0.1 * out["L_vis"])).item() <= TOL


def test_zero_lambda_removes_the_scaffold(tiny):
    vital, proc, dtok = _vital(tiny, lambda_sem=0.0, lambda_vis=0.1)
    assert vital.decoder is None and vital.pj_in is None and vital.vp is not None
    vital2, _, _ = _vital(tiny, lambda_sem=1.0, lambda_vis=0.0)
    assert vital2.vp is None and vital2.decoder is not None
    out = vital(_batch(proc, dtok, K=2), K=2)
    assert out["L_sem"].item() == 0.0 and out["L_vis"].item() > 0


def test_projector_variants_and_per_step_targets():
    h = torch.randn(3, 2, 64)
    for kind in M.VisualProjector.KINDS:
        assert M.VisualProjector(64, 48, kind)(h).shape == (3, 2, 48)
    with pytest.raises(ValueError, match="projector kind"):
        M.VisualProjector(64, 48, "bogus")
    roi, glob = F.normalize(torch.randn(2, 8), dim=-1), F.normalize(torch.randn(2, 8), dim=-1)
    shared = M.visual_targets(roi, glob, 4)
    assert torch.equal(shared[:, 2], roi)
    per = M.visual_targets(roi, glob, 4, per_step=True)
    assert torch.allclose(per[:, -1], roi) and torch.allclose(per[:, 0], 0.75 * glob + 0.25 * roi)


def test_decode_and_project_latent(tiny):
    vital, proc, dtok = _vital(tiny)
    h = torch.randn(3, vital.backbone.config.text_config.hidden_size)
    texts = M.decode_latent(vital.decoder, vital.pj_in, dtok, h, max_new_tokens=5)
    assert len(texts) == 3 and all(isinstance(t, str) for t in texts)
    v = M.project_latent(vital.vp, h)
    assert v.shape == (3, 48) and torch.allclose(v.norm(dim=-1), torch.ones(3), atol=1e-5)


# ---------------------------------------------------------------- save / load / export
def test_save_load_roundtrip_and_peft_export(tiny, tmp_path):
    vital, proc, dtok = _vital(tiny, seed=1)
    for p in vital.parameters():  # move every trainable tensor away from its init
        if p.requires_grad:
            p.data.add_(torch.randn_like(p) * 0.01)
    vital.eval()
    batch = _batch(proc, dtok, K=2)
    with torch.no_grad():
        ref = vital(batch, K=2)
    ck = str(tmp_path / "phase1")
    IO.save_checkpoint(ck, vital, {"phase": 1})
    IO.save_checkpoint(ck, vital, {"phase": 1, "step": 2})   # overwrite in place, atomically
    assert sorted(os.listdir(tmp_path)) == ["phase1"]
    assert json.load(open(os.path.join(ck, "config.json")))["step"] == 2

    fresh, _, _ = _vital(tiny, seed=2)
    fresh.eval()
    assert IO.load_checkpoint(ck, fresh)["phase"] == 1
    with torch.no_grad():
        out = fresh(batch, K=2)
    for k in ("loss", "L_task", "L_sem", "L_vis"):
        assert abs(out[k].item() - ref[k].item()) <= TOL

    from peft import PeftModel
    IO.export_peft(str(tmp_path / "peft"), vital, os.path.join(tiny, "backbone"))
    plain, _ = IO.load_backbone(os.path.join(tiny, "backbone"))
    peft_model = PeftModel.from_pretrained(plain, str(tmp_path / "peft")).eval()
    prefix = batch["prefix"]
    with torch.no_grad():
        ours = vital.backbone(**prefix).logits
        theirs = peft_model(**prefix).logits
    assert (ours - theirs).abs().max() <= TOL


# ---------------------------------------------------------------- bad input
def test_bad_inputs_give_clear_errors(tiny, tmp_path):
    bb, proc = _backbone(tiny)
    with pytest.raises(ValueError, match="no image"):
        IO.build_prefix(proc, [None], ["What is shown?"])
    with pytest.raises(FileNotFoundError, match="nowhere"):
        IO.load_backbone(str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="qwen3"):
        IO.load_backbone(os.path.join(tiny, "decoder"))      # a Qwen3 LM is not a Qwen3-VL backbone
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        IO.load_checkpoint(str(tmp_path / "none"), M.VITAL(bb))

    vital, _, _ = _vital(tiny)
    IO.save_checkpoint(str(tmp_path / "r8"), vital, {})
    wide, _ = IO.load_backbone(os.path.join(tiny, "backbone"))
    M.add_lora(wide, r=4, alpha=8)                          # another LoRA rank
    with pytest.raises(ValueError, match="shape"):
        IO.load_checkpoint(str(tmp_path / "r8"), M.VITAL(wide))
    other = make_tiny(str(tmp_path / "wide"), hidden=96)   # another width
    wb, _ = IO.load_backbone(os.path.join(other, "backbone"))
    M.add_lora(wb, r=8, alpha=16)
    with pytest.raises(ValueError, match="shape"):
        IO.load_checkpoint(str(tmp_path / "r8"), M.VITAL(wb))
