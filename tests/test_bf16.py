"""bf16 end to end on CPU, as on a GPU: the frozen backbone in bf16, the trained tensors (LoRA, decoder,
pj_in, projector) in fp32 under bf16 autocast for training; evaluate.py and explain.py with bf16 weights
and no autocast (what their device_and_dtype picks on CUDA). The three stages run through their own main() on
one tiny checkpoint; pipeline() is reused at real dimensions by tests/test_real_scale.py."""
import json
import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import evaluate as E
import explain as X
import model as M
from pipeline import io as IO
import train
from embedded.tiny import make_tiny
from test_train import write_samples

CHAIN = ["the image shows a bright round region.", "it lies in the upper left part of the image.",
         "its edges are sharp.", "it is brighter than the surrounding tissue."]
CHOICES = ["the region lies in the upper left part of the image.",
           "the region lies in the lower right part of the image."]


pytestmark = pytest.mark.usefixtures("one_thread")


def write_data(folder, d_v, px, n_train=4, n_test=2, seed=0):
    """Grey px x px images with a bright square; train rows with 4-step chains, test rows closed-ended;
    random unit ROI features of width d_v (the encoder's)."""
    os.makedirs(os.path.join(folder, "images"), exist_ok=True)
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n_train + n_test):
        a = (rng.random((px, px)) * 60).astype("uint8")
        a[px // 8:px // 2, px // 8:px // 2] = 230
        Image.fromarray(a).save(os.path.join(folder, "images", f"{i}.png"))
        row = dict(id=f"b{i}", source="phantom", image=f"images/{i}.png",
                   question="where is the bright region?", answer=CHOICES[0], reasoning_chain=CHAIN,
                   latent_steps=4, split="train" if i < n_train else "test")
        if i >= n_train:
            row.update(choices=CHOICES, answer_index=0)
        rows.append(row)
    write_samples(folder, rows, d_v, seed)
    return folder


def bf16_everywhere(monkeypatch):
    """evaluate.py / explain.py pick bf16 weights on CUDA only: make the CPU look like a GPU to them."""
    pick = lambda name: (torch.device("cpu"), torch.bfloat16)
    monkeypatch.setattr(IO, "device_and_dtype", pick)  # evaluate.py and explain.py both ask pipeline.io


def pipeline(models, root, monkeypatch, lora=(8, 16), px=64, batch=2, extra=()):
    """train.py (one optimizer step at K = 4, bf16 autocast) -> evaluate.py (two test items, K = 4) ->
    explain.py (one image, K = 4), all in bf16 on CPU. -> dict of what each stage returned/wrote."""
    d_v = json.load(open(os.path.join(models, "encoder", "config.json")))["hidden_size"]
    data = write_data(os.path.join(root, "data"), d_v, px)
    out = os.path.join(root, "run")
    phase = train.main(["--data", data, "--backbone", f"{models}/backbone", "--decoder", f"{models}/decoder",
                        "--out", out, "--phase", "3", "--init", "none", "--batch-size", str(batch),
                        "--max-steps", "1", "--epochs", "1", "--lora-r", str(lora[0]),
                        "--lora-alpha", str(lora[1]), "--device", "cpu", "--dtype", "bf16", *extra])
    log = [json.loads(l) for l in open(os.path.join(out, "log.jsonl"))]
    bf16_everywhere(monkeypatch)
    ev = os.path.join(root, "eval")
    E.main(["--ckpt", phase, "--data", data, "--out", ev, "--k", "4", "--limit", "2",
            "--max-new-tokens", "4"])
    preds = [json.loads(l) for l in open(os.path.join(ev, "predictions.jsonl"))]
    ex = X.main([os.path.join(data, "images", "0.png"), "Where is the bright region?", "--ckpt", phase,
                 "--encoder", f"{models}/encoder", "--k", "4", "--out", os.path.join(root, "explain"),
                 "--tile", "64", "--max-new-tokens", "4", "--max-step-tokens", "5"])
    return dict(phase=phase, log=log, preds=preds, explain=ex,
                config=json.load(open(os.path.join(phase, "config.json"))))


def check_pipeline(res):
    (step,) = res["log"]
    assert all(math.isfinite(step[k]) and step[k] > 0 for k in ("L_task", "L_sem", "L_vis", "grad_norm"))
    assert res["config"]["args"]["dtype"] == "bf16"
    assert len(res["preds"]) == 2
    assert all(p["K"] == 4 and isinstance(p["prediction"], str) for p in res["preds"])
    ex = res["explain"]
    assert len(ex["steps"]) == 4 and all(isinstance(s["sentence"], str) for s in ex["steps"])
    heat = np.array([s["heatmap"] for s in ex["steps"]], dtype=np.float64)
    assert np.isfinite(heat).all() and os.path.isfile(ex["panel"])


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny(str(tmp_path_factory.mktemp("tiny")))


def test_train_evaluate_explain_in_bf16(tiny, tmp_path, monkeypatch):
    check_pipeline(pipeline(tiny, str(tmp_path), monkeypatch))


def test_bf16_training_dtypes_and_losses_match_fp32(tiny):
    """train.py's bf16 model: frozen weights bf16, every trained tensor fp32 (and its gradient), losses in
    fp32 and close to the fp32 model's (the scaffold heads take the bf16 latents under autocast)."""
    torch.manual_seed(0)
    bb, proc = IO.load_backbone(os.path.join(tiny, "backbone"), dtype=torch.bfloat16)
    M.add_lora(bb, 8, 16, 0.0)
    for m in M.lora_layers(bb):
        torch.nn.init.normal_(m.lora_B, std=0.05)
    dec, dtok = IO.load_decoder(os.path.join(tiny, "decoder"), torch.float32)
    vital = M.VITAL(bb, dec, d_v=48, vp_dropout=0.0).eval()
    ref = M.VITAL(IO.load_backbone(os.path.join(tiny, "backbone"))[0], None, d_v=48).eval()  # fp32 twin
    M.add_lora(ref.backbone, 8, 16, 0.0)
    ref.backbone.load_state_dict({k: v.float() for k, v in bb.state_dict().items()})
    ref.decoder, ref.pj_in, ref.vp = vital.decoder, vital.pj_in, vital.vp
    rng = np.random.default_rng(0)
    imgs = [Image.fromarray((rng.random((64, 64)) * 255).astype("uint8")) for _ in range(2)]
    roi = F.normalize(torch.randn(2, 48), dim=-1)
    batch = IO.make_batch(proc, dtok, imgs, ["where is it?"] * 2, [CHOICES[0]] * 2, [CHAIN] * 2, 4, roi=roi)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = vital(batch, 4)
    out["loss"].backward()
    with torch.no_grad():
        want = ref(batch, 4)
    assert {p.dtype for n, p in bb.named_parameters() if ".lora_" not in n} == {torch.bfloat16}
    for n, p in vital.named_parameters():
        if p.requires_grad:
            assert p.dtype == torch.float32 and p.grad is not None and p.grad.dtype == torch.float32, n
    for k in ("L_task", "L_sem", "L_vis"):
        assert out[k].dtype == torch.float32 and torch.isfinite(out[k])
        assert abs(out[k].item() - want[k].item()) <= 0.05 * abs(want[k].item()) + 1e-3, k
