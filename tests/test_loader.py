"""Loading: the chat template from chat_template.json when the tokenizer has none, the pixel cap,
and ONE image loader (pipeline.io.load_image) behind every stage: train.py, evaluate.py, explain.py and
extract_roi.py see the same pixels for the same picture stored as 8-bit grey, 16-bit grey, RGB and RGBA."""
import json
import os
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import evaluate as E
import explain as X
import extract_roi as R
import model as M
from pipeline import io as IO
import train
from test_evaluate import make_ckpt

KINDS = ("grey8", "grey16", "rgb", "rgba")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("loader"))
    ckpt, data, models = make_ckpt(root)
    return dict(root=root, ckpt=ckpt, data=data, models=models)


def write_variants(folder, w=80, h=64, seed=0):
    """One picture (grey, full 0..255 range, a bright block) stored four ways; RGBA with a varying alpha
    (it must be dropped, not composited). -> {kind: path}, the mask path."""
    os.makedirs(folder, exist_ok=True)
    a = (np.random.default_rng(seed).random((h, w)) * 200).astype(np.uint8)
    a[h // 4:h // 2, w // 2:3 * w // 4] = 250
    a[0, 0], a[0, 1] = 0, 255
    alpha = np.tile(np.linspace(0, 255, w, dtype=np.uint8), (h, 1))
    images = {"grey8": Image.fromarray(a, "L"),
              "grey16": Image.fromarray(a.astype(np.uint16) * 257),  # 0..65535: PIL mode I;16
              "rgb": Image.fromarray(np.stack([a] * 3, -1), "RGB"),
              "rgba": Image.fromarray(np.stack([a, a, a, alpha], -1), "RGBA")}
    paths = {}
    for kind, im in images.items():
        paths[kind] = os.path.join(folder, f"{kind}.png")
        im.save(paths[kind])
    assert Image.open(paths["grey16"]).mode.startswith("I")
    mask = np.zeros((h, w), np.uint8)
    mask[h // 4:h // 2, w // 2:3 * w // 4] = 255
    Image.fromarray(mask).save(os.path.join(folder, "mask.png"))
    return paths, os.path.join(folder, "mask.png")


@pytest.fixture
def spy(monkeypatch):
    """Every path that goes through model.load_image."""
    seen, real = [], IO.load_image

    def load_image(path):
        seen.append(os.path.abspath(path))
        return real(path)

    monkeypatch.setattr(IO, "load_image", load_image)
    return seen


# ---------------------------------------------------------------------------------------------- the image
def test_load_image_gives_the_same_rgb_pixels_for_every_storage(tmp_path):
    paths, _ = write_variants(str(tmp_path))
    ref = np.asarray(IO.load_image(paths["grey8"]))
    assert ref.shape == (64, 80, 3) and ref.dtype == np.uint8 and (ref[..., 0] == ref[..., 2]).all()
    for kind in KINDS:
        assert np.array_equal(np.asarray(IO.load_image(paths[kind])), ref), kind


def test_train_sees_load_images_pixels(tiny, tmp_path):
    paths, _ = write_variants(str(tmp_path))
    assert train.load_image is IO.load_image  # train.py imports the loader, it has none of its own
    _, processor = IO.load_backbone(os.path.join(tiny["models"], "backbone"))
    records = [dict(image_path=paths[k], question="is it there?", answer="yes.", reasoning_chain=["a."], K=1)
               for k in KINDS]
    batch, _, _ = train.collate(records, list(range(4)), processor, None, None, None)
    pv = batch["prefix"]["pixel_values"].view(4, -1, batch["prefix"]["pixel_values"].shape[-1])
    want = IO.build_prefix(processor, [IO.load_image(paths["grey8"])], ["is it there?"])["pixel_values"]
    for i, kind in enumerate(KINDS):
        assert torch.equal(pv[i], want), kind


def test_evaluate_and_explain_see_load_images_pixels(tiny, tmp_path, spy):
    paths, _ = write_variants(str(tmp_path))
    assert X.open_image is E.open_image  # both stages read through pipeline.io.open_image, which calls load_image
    ref = np.asarray(IO.load_image(paths["grey8"]))
    spy.clear()
    for kind in KINDS:
        assert np.array_equal(np.asarray(E.open_image(paths[kind])), ref), kind
    assert spy == [os.path.abspath(paths[k]) for k in KINDS]
    # the stages end to end: the same answer for the four files, and explain.py's same heatmaps
    backbone, processor, _, _ = E.load_inference_model(tiny["ckpt"])
    items = [E.set_prompt(dict(image_path=paths[k], question="Where is the lesion?"), "options") for k in KINDS]
    spy.clear()
    preds = E.predict(backbone, processor, items, 2, SimpleNamespace(batch_size=4, max_new_tokens=4), "cpu")
    assert spy == [os.path.abspath(paths[k]) for k in KINDS] and len(set(preds)) == 1
    heat = []
    for kind in KINDS:
        spy.clear()
        res = X.main([paths[kind], "Where is the lesion?", "--ckpt", tiny["ckpt"], "--k", "2",
                      "--encoder", os.path.join(tiny["models"], "encoder"), "--out", str(tmp_path / kind),
                      "--tile", "64", "--max-new-tokens", "3", "--max-step-tokens", "3"])
        assert os.path.abspath(paths[kind]) in spy
        heat.append([s["heatmap"] for s in res["steps"]])
    assert all(h == heat[0] for h in heat)


def test_extract_roi_sees_load_images_pixels(tiny, tmp_path, spy):
    paths, mask = write_variants(str(tmp_path))
    rows = [dict(id=kind, image=os.path.basename(paths[kind]), mask=os.path.basename(mask)) for kind in KINDS]
    samples = tmp_path / "samples.jsonl"
    samples.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = str(tmp_path / "roi.safetensors")
    R.main(["--samples", str(samples), "--encoder", os.path.join(tiny["models"], "encoder"), "--out", out,
            "--device", "cpu", "--quiet"])
    assert {os.path.abspath(paths[k]) for k in KINDS} <= set(spy)
    feats = load_file(out)
    for name in ("roi", "global"):
        assert all(torch.equal(feats[name][i], feats[name][0]) for i in range(4)), name


# ---------------------------------------------------------------------------------------------- the prompt
def test_chat_template_json_is_read_when_the_tokenizer_has_none(tiny, tmp_path):
    src = os.path.join(tiny["models"], "backbone")
    folder = str(tmp_path / "backbone")
    shutil.copytree(src, folder)
    with open(os.path.join(folder, "chat_template.jinja")) as f:
        template = f.read()
    os.remove(os.path.join(folder, "chat_template.jinja"))  # the tokenizer now has no template ...
    with open(os.path.join(folder, "chat_template.json"), "w") as f:  # ... the processor file has it
        json.dump({"chat_template": template}, f)
    image = Image.new("RGB", (64, 64))
    want = IO.build_prefix(IO.load_processor(src), [image], ["Is the liver visible?"])
    proc = IO.load_processor(folder)
    assert proc.tokenizer.chat_template is None
    got = IO.build_prefix(proc, [image], ["Is the liver visible?"])
    assert torch.equal(got["input_ids"], want["input_ids"])
    os.remove(os.path.join(folder, "chat_template.json"))
    with pytest.raises(ValueError, match="chat template"):
        IO.build_prefix(IO.load_processor(folder), [image], ["Is the liver visible?"])


def test_pixel_cap(tiny):
    """model.MAX_PIXELS (train.py --max-pixels) caps a large image at 448 x 448 px = 14 x 14 tokens of
    32 x 32 px; 0 keeps the folder's own cap (the tiny processor's: 512 x 512); never raised."""
    path = os.path.join(tiny["models"], "backbone")
    big = Image.new("RGB", (1024, 1024))
    grid = lambda cap: IO.build_prefix(IO.load_processor(path, cap), [big], ["q"])["image_grid_thw"][0].tolist()
    assert grid(IO.MAX_PIXELS) == [1, 28, 28] and IO.MAX_PIXELS == 448 * 448
    assert grid(0) == grid(None) == grid(10 ** 9) == [1, 32, 32]
    small = Image.new("RGB", (96, 64))  # under the cap: untouched by it
    assert (IO.build_prefix(IO.load_processor(path, 0), [small], ["q"])["image_grid_thw"].tolist()
            == IO.build_prefix(IO.load_processor(path), [small], ["q"])["image_grid_thw"].tolist())
