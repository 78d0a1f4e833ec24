"""Tests of extract_roi.py (stage 2, §3.4/§A.5): geometry by hand, pooling with a stub encoder whose patch
features are known, and end-to-end runs of the tiny SigLIP encoder (embedded/tiny.py) on PNG fixtures."""
import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors import safe_open

import extract_roi as er
import model
from pipeline import roi_encoder as RE
from embedded.tiny import make_tiny


# ---------------------------------------------------------------------------------------------------
# fixtures
# ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny(str(tmp_path_factory.mktemp("tiny")))


@pytest.fixture(scope="module")
def siglip(tiny):
    return RE.SiglipPatches(os.path.join(tiny, "encoder"))


def args_for(*extra):
    return er.get_args(["--samples", "x", "--encoder", "x", "--out", "x", "--quiet", *extra])


def save_pair(folder, name, img, mask):
    Image.fromarray(np.asarray(img, np.uint8)).save(os.path.join(folder, f"{name}.png"))
    Image.fromarray((np.asarray(mask) > 0).astype(np.uint8) * 255).save(os.path.join(folder, f"{name}_mask.png"))
    return f"{name}.png", f"{name}_mask.png"


def write_jsonl(folder, rows):
    path = os.path.join(folder, "samples.jsonl")
    with open(path, "w") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return path


def sample(sid, image, mask, **kw):
    return dict(id=sid, image=image, mask=mask, split="train", question="where is the target?", **kw)


def target_image(h, w, box):
    """Dark noisy image with a bright rectangle at box = (y0, y1, x0, x1); returns (image, mask)."""
    rng = np.random.default_rng(h * 7 + w)
    img = rng.integers(0, 60, (h, w))
    m = np.zeros((h, w), bool)
    m[box[0]:box[1], box[2]:box[3]] = True
    img[m] = 230
    return img, m


def read(path):
    with safe_open(path, "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


class Stub(RE.SiglipPatches):
    """Known patch features: [one-hot of the patch index (g*g), 4 * (brightness + 1)], on an 8x8 grid of
    112 px. The one-hot part shows exactly which patches were pooled; the brightness part makes a bright
    target's patches the most similar to its ROI feature."""
    kind = "stub"

    def __init__(self):
        self.name, self.path, self.image_size, self.grid = "stub", "stub", 112, 8
        self.dim = 65
        self.mean, self.std = torch.full((3, 1, 1), 0.5), torch.full((3, 1, 1), 0.5)
        self.resample, self.images = Image.BICUBIC, 0

    def encode(self, x):
        self.images += x.shape[0]
        bright = F.avg_pool2d(x.mean(1, keepdim=True), 14).flatten(1)  # (B, 64) in [-1, 1]
        onehot = torch.eye(64).expand(x.shape[0], -1, -1)
        return torch.cat([onehot, 4 * (bright[..., None] + 1)], -1)


def ids_of(meta):
    return json.loads(meta["ids"])


# ---------------------------------------------------------------------------------------------------
# geometry
# ---------------------------------------------------------------------------------------------------
def test_mask_to_grid_is_area_interpolation_plus_threshold():
    rng = np.random.default_rng(0)
    m = rng.random((70, 100)) > 0.6  # non-square: padded to 100x100, content rows 15..85
    frac = RE.grid_fraction(RE.square_pad(m), 8)
    padded = torch.zeros(100, 100)
    padded[15:85] = torch.tensor(m, dtype=torch.float32)
    ref = F.interpolate(padded[None, None], size=(8, 8), mode="area")[0, 0].flatten()
    assert torch.allclose(frac, ref)
    keep, fell = er.binarise(frac, er.MASK_THRESHOLD)
    assert torch.equal(keep, ref >= 0.3) and not fell
    # 100 is not a multiple of 8: the overlapping windows are adaptive average pooling, checked by hand
    assert torch.isclose(frac[0], padded[0:13, 0:13].mean())


def test_mask_threshold_boundary_and_fallback():
    m = np.zeros((112, 112), bool)
    m[28:84, 42:102] = True  # column patch 7 (98..112) covered 4/14 = 0.29 < 0.3
    keep = er.binarise(RE.grid_fraction(RE.square_pad(m), 8), 0.3)[0].view(8, 8)
    assert keep[2:6, 3:7].all() and keep.sum() == 16
    m[28:84, 102] = True  # now 5/14 = 0.36 >= 0.3
    keep = er.binarise(RE.grid_fraction(RE.square_pad(m), 8), 0.3)[0].view(8, 8)
    assert keep[2:6, 3:8].all() and keep.sum() == 20
    line = np.zeros((112, 112), bool)
    line[50, :] = True  # 1/14 of each patch of row 3: nothing reaches 0.3 -> the most-covered patches
    keep, fell = er.binarise(RE.grid_fraction(RE.square_pad(line), 8), 0.3)
    assert fell and keep.view(8, 8)[3].all() and keep.sum() == 8


def test_crop_box_hand_cases():
    m = np.zeros((100, 100), bool)
    m[0:5, 0:5] = True  # corner, smaller than min_crop: widened to 32 and shifted inside
    assert er.crop_box(m, 0.2, 32) == (0, 0, 32, 32)
    m = np.zeros((100, 100), bool)
    m[40:60, 60:100] = True  # touches the right border: margin 0.1*40 = 4 clipped on the right
    assert er.crop_box(m, 0.1, 8) == (56, 38, 100, 62)
    m = np.zeros((100, 100), bool)
    m[50, 50] = True  # one pixel: a 32 px window around it
    x0, y0, x1, y1 = er.crop_box(m, 0.05, 32)
    assert (x1 - x0, y1 - y0) == (32, 32) and x0 <= 50 < x1 and y0 <= 50 < y1 and x0 == 34
    assert er.crop_box(np.ones((100, 60), bool), 0.05, 32) == (0, 0, 60, 100)  # full-image mask
    assert er.crop_box(np.ones((20, 20), bool), 0.05, 32) == (0, 0, 20, 20)  # image smaller than min_crop
    plan = er.plan_roi(np.ones((100, 60), bool), 0.1, 0.05, 32)
    assert plan.pathway == er.FULL and plan.box == (0, 0, 60, 100) and plan.ratio == 1.0
    assert er.plan_roi(m, 0.1, 0.05, 32).pathway == er.CROP


def test_crop_validity_mask_by_hand():
    # box (40, 0, 160, 44): 120x44 crop -> 120 square, content rows 38..82; 15 px patches: rows 2 and 5
    # hold 7/15 real image (< 0.5, invalid), rows 3 and 4 are real
    m = np.zeros((200, 200), bool)
    m[0:40, 50:150] = True
    box = er.crop_box(m, 0.1, 32)
    assert box == (40, 0, 160, 44)
    mfrac, content = er.view_grids(m, box, 8)
    valid = er.binarise(content, er.VALID_THRESHOLD)[0].view(8, 8)
    assert valid[3:5].all() and valid.sum() == 16
    assert torch.isclose(content.view(8, 8)[2, 0], torch.tensor(7 / 15))
    sq = RE.pad_image(Image.fromarray(np.full((200, 200), 255, np.uint8)).convert("RGB"), box)
    a = np.asarray(sq)[..., 0]
    assert sq.size == (120, 120) and a[38:82].min() == 255 and a[:38].max() == 0 and a[82:].max() == 0


# ---------------------------------------------------------------------------------------------------
# pooling with known patch features
# ---------------------------------------------------------------------------------------------------
def run_stub(tmp_path, rows, pairs, *extra):
    for name, (img, m) in pairs.items():
        save_pair(tmp_path, name, img, m)
    path = write_jsonl(tmp_path, rows)
    enc = Stub()
    out = str(tmp_path / "roi.safetensors")
    er.extract(path, out, enc, args_for("--out", out, *extra))
    t, meta = read(out)
    return t, meta, enc


@pytest.mark.parametrize("case", ["full_square", "full_nonsquare", "crop_border"])
def test_pooled_feature_is_mean_of_expected_patches(tmp_path, case):
    if case == "full_square":  # 112 px: patch (r, c) = pixels 14r.., 14c..; target = rows 2..5, cols 3..6
        img, m = target_image(112, 112, (28, 84, 42, 98))
        expect, pathway, extra = [r * 8 + c for r in range(2, 6) for c in range(3, 7)], er.FULL, []
    elif case == "full_nonsquare":  # 224x112 -> 224 square, rows 56..168 real; target -> rows 2,3 cols 0,1
        img, m = target_image(112, 224, (0, 56, 0, 56))
        expect, pathway, extra = [16, 17, 24, 25], er.FULL, []
    else:  # the hand-made crop of test_crop_validity_mask_by_hand: valid rows 3 and 4
        img, m = target_image(200, 200, (0, 40, 50, 150))
        expect, pathway, extra = list(range(24, 40)), er.CROP, ["--tau", "0.2", "--delta", "0.1"]
    t, meta, enc = run_stub(tmp_path, [sample("a", "t.png", "t_mask.png")], {"t": (img, m)}, *extra)
    roi = t["roi"][0]
    assert int(t["pathway"][0]) == pathway
    assert torch.nonzero(roi[:64]).flatten().tolist() == expect  # exactly these patches were pooled
    # and the value is their mean, L2-normalised: recompute from the stub's features of the same view
    x = enc.preprocess(RE.pad_image(Image.fromarray(img.astype(np.uint8)).convert("RGB"), tuple(t["box"][0].tolist())))
    f = enc.encode(x[None])[0]
    assert torch.allclose(roi, F.normalize(f[expect].mean(0), dim=0), atol=1e-6)
    assert abs(float(roi.norm()) - 1) < 1e-5 and abs(float(t["global"][0].norm()) - 1) < 1e-5
    top = t["top5_index"][0].tolist()
    if pathway == er.FULL:
        assert set(top[:len(expect)]) <= set(expect)  # the bright target's patches rank first
    else:  # crop grid: the target spans crop columns 10..110 of 120 -> patch columns 1..6 of rows 3, 4
        assert all(i // 8 in (3, 4) and 1 <= i % 8 <= 6 for i in top)
    assert torch.allclose(t["top5_score"][0], F.normalize(f[top], dim=-1) @ roi, atol=1e-5)
    if case == "full_nonsquare":  # global = mean of the real (non-padding) patches: rows 2..5
        assert torch.nonzero(t["global"][0][:64]).flatten().tolist() == list(range(16, 48))


def test_shared_pairs_are_encoded_once(tmp_path):
    pairs, rows = {}, []
    for i in range(3):
        img, big = target_image(112, 112, (10, 70, 10, 70))
        small = np.zeros_like(big)
        small[80:86, 80:90] = True
        pairs[f"im{i}"] = (img, big)
        Image.fromarray(small.astype(np.uint8) * 255).save(tmp_path / f"im{i}_small.png")
        for q in range(2):  # two questions about each mask
            rows += [sample(f"big{i}_{q}", f"im{i}.png", f"im{i}_mask.png"),
                     sample(f"small{i}_{q}", f"im{i}.png", f"im{i}_small.png")]
    t, meta, enc = run_stub(tmp_path, rows, pairs, "--shard-size", "64")
    assert enc.images == 3 + 3  # one full view per image (both masks share it) + one crop per small mask
    assert ids_of(meta) == [r["id"] for r in rows]
    for i in range(0, len(rows), 4):
        assert torch.equal(t["roi"][i], t["roi"][i + 2]) and torch.equal(t["roi"][i + 1], t["roi"][i + 3])
        assert torch.equal(t["global"][i], t["global"][i + 1])  # same image: same global feature
        assert not torch.allclose(t["roi"][i], t["roi"][i + 1])


# ---------------------------------------------------------------------------------------------------
# the tiny SigLIP encoder, end to end
# ---------------------------------------------------------------------------------------------------
def test_patch_features_are_last_block_before_post_layernorm(siglip):
    x = torch.randn(2, 3, 112, 112)
    f = siglip.encode(x)
    assert f.shape == (2, siglip.grid ** 2, siglip.dim) == (2, 64, 48)
    h = siglip.model.embeddings(x)
    for layer in siglip.model.encoder.layers:
        h = layer(h, None)
    assert torch.allclose(f, h, atol=1e-5)  # the last encoder block's output ...
    last = siglip.model(pixel_values=x).last_hidden_state
    assert torch.allclose(siglip.model.post_layernorm(f), last, atol=1e-5)  # ... which post_layernorm maps
    assert not torch.allclose(f, last, atol=1e-2)  # to the (different) last_hidden_state


def phantom(tmp_path, n=5):
    rows = []
    for i in range(n):
        h, w = (96, 150) if i % 2 else (120, 120)
        box = (10, 80, 20, 90) if i % 3 else (40, 48, 50, 57)  # large (full) or small (crop) targets
        img, m = target_image(h, w, box)
        a, b = save_pair(tmp_path, f"p{i}", img, m)
        rows += [sample(f"p{i}_q{q}", a, b) for q in range(2)]
    return write_jsonl(tmp_path, rows[::-1]), [r["id"] for r in rows[::-1]]


def test_end_to_end_metadata_row_order_unit_norm(tmp_path, tiny):
    path, ids = phantom(tmp_path)
    out = str(tmp_path / "roi.safetensors")
    rep = er.main(["--samples", path, "--encoder", os.path.join(tiny, "encoder"), "--out", out, "--quiet",
                   "--batch-size", "3"])
    t, meta = read(out)
    assert ids_of(meta) == ids and rep["failed"] == []
    assert meta["d_v"] == "48" and meta["grid"] == "8" and meta["tau"] == "0.1" and meta["delta"] == "0.05"
    assert meta["encoder_kind"] == "siglip" and meta["encoder"] == "encoder"
    n = len(ids)
    assert t["roi"].shape == t["global"].shape == (n, 48) and t["roi"].dtype == torch.float32
    assert t["top5_index"].shape == (n, 5) and t["top5_index"].dtype == torch.int64 and t["top5_score"].shape == (n, 5)
    assert torch.allclose(t["roi"].norm(dim=-1), torch.ones(n), atol=1e-5)
    assert torch.allclose(t["global"].norm(dim=-1), torch.ones(n), atol=1e-5)
    assert set(t["pathway"].tolist()) == {0, 1} and (t["top5_index"] < 64).all() and (t["top5_index"] >= 0).all()
    assert not os.path.exists(str(tmp_path / "roi_shards"))  # cleaned after the final atomic write
    # the features do not depend on the other images in a batch
    out1 = str(tmp_path / "roi_b1.safetensors")
    er.main(["--samples", path, "--encoder", os.path.join(tiny, "encoder"), "--out", out1, "--quiet", "--batch-size", "1"])
    assert torch.allclose(read(out1)[0]["roi"], t["roi"], atol=1e-5)


def test_resume_after_interruption_gives_the_same_file(tmp_path, siglip, monkeypatch):
    path, ids = phantom(tmp_path, n=6)
    a = args_for("--shard-size", "2", "--batch-size", "2")
    one = str(tmp_path / "one.safetensors")
    er.extract(path, one, siglip, a)
    real, calls = er.extract_chunk, []

    def dies_on_third(*args, **kw):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt("simulated crash")
        return real(*args, **kw)
    monkeypatch.setattr(er, "extract_chunk", dies_on_third)
    two = str(tmp_path / "two.safetensors")
    with pytest.raises(KeyboardInterrupt):
        er.extract(path, two, siglip, a)
    assert not os.path.exists(two) and len(os.listdir(tmp_path / "two_shards")) == 2
    calls.clear()
    monkeypatch.setattr(er, "extract_chunk", real)
    seen = []
    monkeypatch.setattr(er, "extract_chunk", lambda units, *r: seen.extend(units) or real(units, *r))
    er.extract(path, two, siglip, a)
    assert len(seen) == 2  # only the 2 pairs of the unfinished third chunk were encoded again
    (t1, m1), (t2, m2) = read(one), read(two)
    assert m1 == m2 and t1.keys() == t2.keys()
    for k in t1:
        assert torch.equal(t1[k], t2[k]), k


def test_shards_from_other_settings_are_refused(tmp_path, siglip):
    path, _ = phantom(tmp_path, n=2)
    out = str(tmp_path / "roi.safetensors")
    er.extract(path, out, siglip, args_for("--keep-shards"))
    with pytest.raises(ValueError, match="other settings"):
        er.extract(path, out, siglip, args_for("--tau", "0.3"))


def test_bad_inputs_are_reported_not_fatal(tmp_path, siglip):
    ok_img, ok_m = target_image(100, 100, (30, 60, 30, 60))
    save_pair(tmp_path, "ok", ok_img, ok_m)
    save_pair(tmp_path, "empty", ok_img, np.zeros((100, 100)))
    save_pair(tmp_path, "size", ok_img, np.ones((50, 100)))
    (tmp_path / "corrupt_mask.png").write_bytes(b"not a png")
    border = np.zeros((100, 100), bool)
    border[45:55, 96:100] = True  # on the right border
    save_pair(tmp_path, "border", ok_img, border)
    one = np.zeros((100, 100), bool)
    one[0, 99] = True  # one pixel, in a corner
    save_pair(tmp_path, "one", ok_img, one)
    save_pair(tmp_path, "wide", *target_image(60, 300, (20, 40, 250, 290)))
    save_pair(tmp_path, "huge", *target_image(2400, 3000, (1000, 1100, 1500, 1650)))
    rows = [sample("ok", "ok.png", "ok_mask.png"), sample("no_image", "missing.png", "ok_mask.png"),
            sample("corrupt", "ok.png", "corrupt_mask.png"), sample("empty", "ok.png", "empty_mask.png"),
            sample("size", "ok.png", "size_mask.png"), sample("border", "ok.png", "border_mask.png"),
            sample("one", "ok.png", "one_mask.png"), sample("wide", "wide.png", "wide_mask.png"),
            sample("huge", "huge.png", "huge_mask.png"), "{not json", json.dumps({"id": "nomask", "image": "ok.png"}),
            sample("ok", "ok.png", "ok_mask.png")]  # duplicate id
    path = write_jsonl(tmp_path, rows)
    out = str(tmp_path / "roi.safetensors")
    rep = er.extract(path, out, siglip, args_for())
    t, meta = read(out)
    assert ids_of(meta) == ["ok", "border", "one", "wide", "huge"]
    assert torch.allclose(t["roi"].norm(dim=-1), torch.ones(5), atol=1e-5)
    failed = {f["id"]: f for f in rep["failed"]}
    assert set(failed) == {"no_image", "corrupt", "empty", "size", None, "nomask", "ok"}
    assert "missing.png" in failed["no_image"]["reason"] and "corrupt_mask.png" in failed["corrupt"]["reason"]
    assert "empty mask" in failed["empty"]["reason"] and "50" in failed["size"]["reason"]
    assert failed[None]["line"] == 10 and "invalid JSON" in failed[None]["reason"]
    assert "duplicate" in failed["ok"]["reason"] and failed["nomask"]["line"] == 11
    with open(str(tmp_path / "roi_report.json")) as f:
        assert len(json.load(f)["failed"]) == 7
    # the border and one-pixel masks took the crop pathway with a real (not padding-only) box
    b = {i: t["box"][k].tolist() for k, i in enumerate(ids_of(meta))}
    assert b["border"][2] == 100 and b["one"] == [68, 0, 100, 32] and t["pathway"][1:].eq(er.CROP).all()


def test_self_encoder_pools_backbone_vision_tokens(tmp_path, tiny):
    path, ids = phantom(tmp_path, n=3)
    out = str(tmp_path / "roi_self.safetensors")
    er.main(["--samples", path, "--encoder", os.path.join(tiny, "backbone"), "--encoder-kind", "self",
             "--self-size", "224", "--out", out, "--quiet"])
    t, meta = read(out)
    assert meta["encoder_kind"] == "self" and meta["grid"] == "7" and meta["d_v"] == "64"  # 224/32, out_hidden
    assert t["roi"].shape == (len(ids), 64) and torch.allclose(t["roi"].norm(dim=-1), torch.ones(len(ids)), atol=1e-5)
    enc = RE.QwenSelfPatches(os.path.join(tiny, "backbone"), 224)
    x = enc.preprocess(Image.new("RGB", (224, 224), (90, 90, 90)))
    assert enc.encode(x[None]).shape == (1, 49, 64)
    with pytest.raises(ValueError, match="multiple of 32"):
        RE.QwenSelfPatches(os.path.join(tiny, "backbone"), 200)


def test_grid_search_writes_report(tmp_path, siglip):
    path, _ = phantom(tmp_path, n=6)
    out = str(tmp_path / "roi.safetensors")
    a = args_for("--subset", "6", "--taus", "0.05", "0.5", "--deltas", "0", "0.2")
    best = er.run_grid_search(path, out, siglip, a)
    with open(str(tmp_path / "roi_gridsearch.json")) as f:
        rep = json.load(f)
    assert rep["subset"] == 6 and len(rep["table"]) == 4 and rep["chosen"] == best
    assert (best["tau"], best["delta"]) in {(0.05, 0), (0.05, 0.2), (0.5, 0), (0.5, 0.2)}
    for r in rep["table"]:
        assert 0 < r["coverage"] <= 100 and r["intensity"] > 0 and r["snr"] > 0 and r["n"] == 6
    # large targets cover 34% of their image, small ones < 1%: tau = 0.5 crops all, 0.05 only the small
    assert {r["n_crop"] for r in rep["table"] if r["tau"] == 0.5} == {6}
    assert {r["n_crop"] for r in rep["table"] if r["tau"] == 0.05} == {2}
    cov = {(r["tau"], r["delta"]): r["coverage"] for r in rep["table"]}
    assert cov[0.5, 0] > cov[0.5, 0.2]  # a wider margin leaves a smaller share of the crop to the ROI
    assert "| tau | delta |" in open(str(tmp_path / "roi_gridsearch.md")).read()
    with Image.open(str(tmp_path / "roi_gridsearch.png")) as im:
        assert im.size[0] > 300 and len(np.unique(np.asarray(im.convert("RGB")).reshape(-1, 3), axis=0)) > 10  # three coloured heatmaps


def test_user_mistakes_are_one_line_errors(tmp_path, tiny):
    """Every user mistake is an ROIError (one line on stderr, exit 1), raised before the encoder loads."""
    import subprocess
    import sys
    path, _ = phantom(tmp_path, n=1)
    out = str(tmp_path / "r.safetensors")
    with pytest.raises(er.ROIError, match="--encoder .*nope does not exist"):
        er.main(["--samples", path, "--encoder", str(tmp_path / "nope"), "--out", out])
    with pytest.raises(er.ROIError, match="holds no config.json"):
        er.main(["--samples", path, "--encoder", str(tmp_path), "--out", out])
    with pytest.raises(er.ROIError, match="'qwen3_vl' model"):  # the backbone given as a SigLIP encoder
        er.main(["--samples", path, "--encoder", os.path.join(tiny, "backbone"), "--out", out])
    with pytest.raises(er.ROIError, match="--samples .*: no such file"):
        er.main(["--samples", str(tmp_path / "none.jsonl"), "--encoder", os.path.join(tiny, "encoder"), "--out", out])
    with pytest.raises(er.ROIError, match="--tau out of range"):
        er.main(["--samples", path, "--encoder", os.path.join(tiny, "encoder"), "--out", out, "--tau", "nan"])
    # every sample failing: one line, and the report still lists why
    bad = write_jsonl(str(tmp_path), [sample("a", "missing.png", "m.png"), sample("b", "gone.png", "m.png")])
    with pytest.raises(er.ROIError, match=r"no sample of .* could be extracted \(2 failed; first: cannot read image"):
        er.main(["--samples", bad, "--encoder", os.path.join(tiny, "encoder"), "--out", out, "--quiet"])
    assert len(json.load(open(tmp_path / "r_report.json"))["failed"]) == 2
    # as a command: exit status 1, one line on stderr, no traceback
    p = subprocess.run([sys.executable, os.path.join(os.path.dirname(er.__file__), "extract_roi.py"), "--samples", path,
                        "--encoder", str(tmp_path / "nope"), "--out", out], capture_output=True, text=True)
    assert p.returncode == 1 and p.stderr.count("\n") == 1 and p.stderr.startswith("extract_roi.py: error: --encoder")
