"""Real dimensions on CPU: the paper's Qwen3-VL-8B, Qwen3-1.7B and SigLIP-448 shapes with one block
per LLM / encoder and random weights (bench/real.py) go through train.py (one optimizer step at K = 4 on
448-px images, bf16 autocast, AdamW), evaluate.py (two closed-ended items at K = 4) and explain.py (one
image, four steps, 32 x 32 heatmaps), all in bf16 as on a GPU: hidden 4096, head_dim 128, M-RoPE sections
24/20/20, the 27-block ViT with its deepstack taps 8/16/24 (kept whole: the taps need depth > 24),
vocabularies 151,936. Marked slow (~60 s, ~12 GB of RAM: the fp32 decoder's 311M-entry embedding with its
gradient and AdamW moments alone is 5 GB): `python -m pytest -q -m slow tests`."""
import json
import os
import sys

import pytest
from PIL import Image

import model as M

from pipeline import io as IO
import train

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
from real import write_real_models  # noqa: E402
from test_bf16 import check_pipeline, pipeline  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]


def test_real_dimensions_train_evaluate_explain_in_bf16(tmp_path, monkeypatch):
    models = write_real_models(str(tmp_path / "models"), layers=1, dec_layers=1, enc_layers=1)
    cfg = json.load(open(os.path.join(models, "backbone", "config.json")))
    text, vision = cfg["text_config"], cfg["vision_config"]
    assert (text["hidden_size"], text["head_dim"], text["vocab_size"]) == (4096, 128, 151936)
    assert text["rope_parameters"]["mrope_section"] == [24, 20, 20]
    assert vision["deepstack_visual_indexes"] == [8, 16, 24] and vision["depth"] == 27
    # the pixel cap: a 1024 x 1024 image gets 196 visual tokens (448 x 448), a 448-px one as many
    processor = IO.load_processor(os.path.join(models, "backbone"))  # as load_backbone makes it
    big, small = tmp_path / "big.png", tmp_path / "small.png"
    Image.new("L", (1024, 1024)).save(big)
    Image.new("L", (448, 448)).save(small)
    records = [dict(image_path=str(big)), dict(image_path=str(small))]
    assert train.image_tokens(records, processor) == [196, 196]

    res = pipeline(models, str(tmp_path), monkeypatch, lora=(64, 128), px=448, batch=1)
    check_pipeline(res)
    assert res["config"]["args"]["max_pixels"] == IO.MAX_PIXELS
    heat = res["explain"]["steps"][0]["heatmap"]
    assert (len(heat), len(heat[0])) == (32, 32)  # SigLIP-448, patch 14
