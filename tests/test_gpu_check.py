"""The prepared GPU check (bench/gpu_check.py) in its tiny form, in bf16 on CPU as it runs on a GPU: the
real-size run on a lent GPU must not be the first time this code path runs. Also pins the bf16 explain
crash it found (pj_in / projector in fp32, latent states in bf16)."""
import json
import os
import sys

import torch

import model as M

from pipeline import io as IO
from embedded.tiny import make_tiny

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
import gpu_check  # noqa: E402


def test_gpu_check_tiny_bf16_runs_every_part(tmp_path):
    out = tmp_path / "gc"
    res = gpu_check.main(["--tiny", "--dtype", "bf16", "--out", str(out), "--train", "1x96x0", "2x96",
                          "--train-reps", "1", "--reps", "1", "--answer-tokens", "4"])
    saved = json.load(open(out / "gpu_check.json"))
    assert saved["train"] == json.loads(json.dumps(res["train"]))
    assert [(r["batch"], r["K"], r["status"]) for r in res["train"]] == [(1, 0, "ok"), (2, 4, "ok")]
    k4 = res["train"][1]
    assert all(torch.isfinite(torch.tensor(k4[k])) and k4[k] > 0 for k in ("L_task", "L_sem", "L_vis"))
    assert res["train"][0]["L_sem"] == 0 and k4["samples_per_s"] > 0 and k4["peak_gib"] > 0
    forms = {r["form"] for r in res["latency"]}
    assert len(forms) == 4 and sorted(r["K"] for r in res["latency"]) == sorted(list(range(5)) * 4)
    assert any("fast path" in f for f in forms) and res["weight_bytes"] > 0
    assert all(r["ms"] > 0 for r in res["latency"])
    e = res["explain"]
    assert len(e["sentences"]) == 4 and e["heat_shape"] == [4, 8, 8] and os.path.isfile(e["panel"])
    assert -1.0 <= e["heat_range"][0] <= e["heat_range"][1] <= 1.0


def test_scaffold_heads_read_bf16_latents(tmp_path):
    """On a GPU the backbone is bf16 while pj_in and the projector stay fp32 (they are trained): reading a
    bf16 latent out must cast it, not raise a dtype error (explain.py runs without autocast)."""
    folder = make_tiny(str(tmp_path / "tiny"))
    bb, _ = IO.load_backbone(os.path.join(folder, "backbone"), dtype=torch.bfloat16)
    dec, tok = IO.load_decoder(os.path.join(folder, "decoder"), dtype=torch.bfloat16)
    vital = M.VITAL(bb, dec, d_v=48)
    assert vital.pj_in.weight.dtype == torch.float32 and vital.vp.out.weight.dtype == torch.float32
    h = torch.randn(3, bb.config.text_config.hidden_size, dtype=torch.bfloat16)
    assert len(M.decode_latent(vital.decoder, vital.pj_in, tok, h, max_new_tokens=3)) == 3
    v = M.project_latent(vital.vp, h)
    assert v.shape == (3, 48) and torch.allclose(v.norm(dim=-1), torch.ones(3), atol=1e-5)
