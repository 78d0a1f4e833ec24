"""demo/pretrain_encoder.py: the tiny SigLIP trained with SiglipModel's sigmoid loss is saved as an encoder folder
that extract_roi.py loads like MedSigLIP, its vision weights are the trained ones, and a rerun does nothing."""
import json
import os

import torch
from safetensors.torch import load_file

import prepare_data as P
from demo import pretrain_encoder as PE
from embedded.tiny import make_tiny
from pipeline.roi_encoder import SiglipPatches


def test_pretrained_encoder_loads_like_medsiglip(tmp_path, capsys):
    models, data, out = (str(tmp_path / x) for x in ("models", "corpus", "enc"))
    make_tiny(models)
    P.main(["--source", "phantom", "--out", data, "--n", "40", "--seed", "3", "--image-size", "96", "--captions",
            "--test-frac", "0", "--val-frac", "0", "--workers", "1"])
    clip, _, _, _ = PE.build(models, text_len=48)
    assert float(clip.logit_scale.exp()) == 10.0 and float(clip.logit_bias) == -10.0  # SigLIP's start
    PE.main(["--data", data, "--models", models, "--out", out, "--epochs", "2", "--batch-size", "16",
             "--heldout", "8"])
    log = json.loads(open(os.path.join(out, "pretrain.json")).read(),
                     parse_constant=lambda c: (_ for _ in ()).throw(ValueError(c)))
    assert [e["epoch"] for e in log["epochs"]] == [1, 2] and log["n_train"] == 32 and log["n_heldout"] == 8
    assert all(e["loss"] > 0 for e in log["epochs"])
    enc = SiglipPatches(out)  # the folder extract_roi.py and explain.py read
    assert (enc.grid, enc.dim) == (8, 48)
    trained = load_file(os.path.join(out, "model.safetensors"))
    random = load_file(os.path.join(models, "encoder", "model.safetensors"))
    assert trained.keys() == random.keys()
    assert any(not torch.equal(trained[k], random[k]) for k in trained)  # the weights moved
    PE.main(["--data", data, "--models", models, "--out", out])  # rerun: already there, nothing to do
    assert "nothing to do" in capsys.readouterr().out
