"""Tests for prepare_data.py (stage 1): readers, phantom truthfulness, quality gate, OpenAI teacher
against a loopback server, crash-safety, bad inputs. CPU only, a few seconds each."""
import base64
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
from PIL import Image

from pipeline import image_facts as F
import prepare_data as P
from pipeline import quality_gate as G
from embedded.phantom import phantom_case

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def read_jsonl(path):
    return [json.loads(line) for line in open(path)] if os.path.exists(path) else []


def run(tmp_out, *argv):
    return P.main(["--out", str(tmp_out), "--workers", "1", *argv])


# ----------------------------------------------------------------------------- MSD
def write_nifti(path, array):
    import nibabel as nib
    os.makedirs(os.path.dirname(path), exist_ok=True)
    nib.save(nib.Nifti1Image(array, np.eye(4)), path)


def make_msd(tmp_path):
    liver = tmp_path / "Task03_Liver"
    vol = np.full((40, 40, 6), -1000, np.float32)  # air everywhere
    lab = np.zeros((40, 40, 6), np.uint8)
    vol[5:19, 5:19, :], lab[5:19, 5:19, :] = 100, 1  # liver: 196 px on every slice, 100 HU
    vol[25:36, 25:36, 2:4], lab[25:36, 25:36, 2:4] = 50, 2  # cancer: 121 px on slices 2 and 3
    lab[30:37, 2:9, 5] = 2  # 49 px: below the 100-pixel rule, must be skipped
    write_nifti(str(liver / "imagesTr" / "liver_0.nii.gz"), vol)
    write_nifti(str(liver / "labelsTr" / "liver_0.nii.gz"), lab)
    (liver / "imagesTr" / "._liver_0.nii.gz").write_bytes(b"\x00\x05\x16\x07 apple double junk")
    json.dump({"name": "Liver", "modality": {"0": "CT"}, "labels": {"0": "background", "1": "liver", "2": "cancer"},
               "training": [{"image": "./imagesTr/liver_0.nii.gz", "label": "./labelsTr/liver_0.nii.gz"},
                            {"image": "./imagesTr/._liver_0.nii.gz", "label": "./labelsTr/._liver_0.nii.gz"},
                            {"image": "./imagesTr/liver_9.nii.gz", "label": "./labelsTr/liver_9.nii.gz"}]},
              open(liver / "dataset.json", "w"))
    brain = tmp_path / "Task01_BrainTumour"
    rng = np.random.default_rng(0)
    mri = np.zeros((32, 32, 3, 2), np.float32)
    mri[4:28, 4:28] = rng.uniform(100, 900, (24, 24, 3, 2))
    mri[10:22, 10:22, :, 1] += 5000  # channel 1 has an outlier region: the percentile clip must act
    seg = np.zeros((32, 32, 3), np.uint8)
    seg[10:22, 10:22, :] = 1  # 144 px
    write_nifti(str(brain / "imagesTr" / "BRATS_001.nii.gz"), mri)
    write_nifti(str(brain / "labelsTr" / "BRATS_001.nii.gz"), seg)
    json.dump({"name": "BrainTumour", "modality": {"0": "FLAIR", "1": "T1w"}, "labels": {"0": "background", "1": "edema"},
               "training": [{"image": "./imagesTr/BRATS_001.nii.gz", "label": "./labelsTr/BRATS_001.nii.gz"}]},
              open(brain / "dataset.json", "w"))
    return liver, brain


def test_msd_reading(tmp_path):
    liver, brain = make_msd(tmp_path)
    out = tmp_path / "out"
    run(out, "--source", "msd", "--msd-root", str(liver), str(brain), "--msd-stride", "1",
        "--questions-per-image", "6")
    samples, rejects = read_jsonl(out / "samples.jsonl"), read_jsonl(out / "rejects.jsonl")
    ids = [s["id"] for s in samples]
    assert len(ids) == len(set(ids))
    liv = [s for s in samples if s["subset"] == "Task03_Liver"]
    # one case per (slice, label) with >= 100 px: liver on 6 slices, cancer on 2 (the 49-px slice is skipped)
    cases = {(s["meta"]["slice"], s["meta"]["present_target"]) for s in liv}
    assert cases == {(z, "liver") for z in range(6)} | {(2, "liver tumor"), (3, "liver tumor")}
    assert len(liv) == 8 * 6 and {s["modality"] for s in liv} == {"CT"}
    assert {s["target_type"] for s in liv if not s["meta"]["negative"]} == {"organ", "tumor"}
    assert not any("._" in s["meta"]["volume"] for s in liv)
    # liver window [-25, 230]: 100 HU -> (100 + 25) / 255 * 255 = 125 exactly where the mask is
    s = next(x for x in liv if x["meta"]["present_target"] == "liver")
    img, mask = np.array(Image.open(out / s["image"])), np.array(Image.open(out / s["mask"])) > 0
    assert img.shape == (40, 40) and mask.sum() == 196 and set(np.unique(img[mask])) == {125}
    assert set(np.unique(img[~mask])) <= {0, 75}  # air -> 0, cancer (50 HU) -> 75
    # a missing file listed in dataset.json -> a reject that names it; the rest continues
    assert any("missing_file" in r["reasons"][0] and "liver_9.nii.gz" in r["reasons"][0] for r in rejects)
    # 4-D MRI: one image per channel, each normalised by its own 0.5-99.5 percentiles
    br = [s for s in samples if s["subset"] == "Task01_BrainTumour"]
    assert {s["meta"]["channel"] for s in br} == {0, 1} and {s["modality"] for s in br} == {"MRI"}
    assert {s["meta"]["sequence"] for s in br} == {"FLAIR", "T1w"}
    assert {s["target_type"] for s in br} == {"tumor"}
    for s in br:
        img = np.array(Image.open(out / s["image"]))
        assert img.max() == 255 and (img[4:28, 4:28] > 0).mean() > 0.9  # tissue spreads over the range


def test_msd_broken_folder_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(SystemExit):
        run(tmp_path / "o", "--source", "msd", "--msd-root", str(tmp_path / "nope"))
    assert str(tmp_path / "nope") in capsys.readouterr().err
    (tmp_path / "Task09_Spleen").mkdir()
    with pytest.raises(SystemExit, match="dataset.json not found"):
        run(tmp_path / "o", "--source", "msd", "--msd-root", str(tmp_path / "Task09_Spleen"))
    (tmp_path / "Task09_Spleen" / "dataset.json").write_text('{"training": [')
    with pytest.raises(SystemExit, match="Task09_Spleen.*dataset.json"):
        run(tmp_path / "o", "--source", "msd", "--msd-root", str(tmp_path / "Task09_Spleen"))


def test_msd_size_mismatch_and_corrupt_volume_are_rejects(tmp_path):
    root = tmp_path / "Task09_Spleen"
    write_nifti(str(root / "imagesTr" / "a.nii.gz"), np.zeros((20, 20, 3), np.float32))
    write_nifti(str(root / "labelsTr" / "a.nii.gz"), np.zeros((20, 21, 3), np.uint8))
    (root / "imagesTr" / "b.nii.gz").write_bytes(b"not a nifti at all")
    (root / "labelsTr" / "b.nii.gz").write_bytes(b"not a nifti at all")
    json.dump({"modality": {"0": "CT"}, "labels": {"0": "background", "1": "spleen"},
               "training": [{"image": f"./imagesTr/{n}.nii.gz", "label": f"./labelsTr/{n}.nii.gz"} for n in "ab"]},
              open(root / "dataset.json", "w"))
    with pytest.raises(SystemExit, match="no sample accepted, 2 rejected"):  # nothing usable: non-zero exit
        run(tmp_path / "o", "--source", "msd", "--msd-root", str(root))
    reasons = " ".join(x for r in read_jsonl(tmp_path / "o" / "rejects.jsonl") for x in r["reasons"])
    assert "size_mismatch" in reasons and "unreadable_volume" in reasons and "b.nii.gz" in reasons
    assert json.load(open(tmp_path / "o" / "stats.json"))["rejects"] == 2


# ----------------------------------------------------------------------------- BiomedParse
def png(path, array):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(array).save(path)


def test_biomedparse_reading_and_bad_inputs(tmp_path):
    root = tmp_path / "MyCT"
    tr, trm, te, tem = (root / d for d in ("train", "train_mask", "test", "test_mask"))
    img = np.full((64, 64, 3), 90, np.uint8)
    img[8:30, 8:30] = 200
    png(tr / "case_1_CT_abdomen.png", img)
    m1, m2 = np.zeros((64, 64), np.uint8), np.zeros((64, 64), np.uint8)
    m1[8:30, 8:30], m2[40:60, 40:60] = 255, 255
    png(trm / "case_1_CT_abdomen_liver.png", m1)
    png(trm / "case_1_CT_abdomen_left+kidney.png", m2)  # '+' is a space; one image, many masks
    png(tr / "trunc_2_CT_abdomen.png", img)
    data = (tr / "trunc_2_CT_abdomen.png").read_bytes()
    (tr / "trunc_2_CT_abdomen.png").write_bytes(data[:len(data) // 2])  # truncated image
    png(trm / "trunc_2_CT_abdomen_liver.png", m1)
    png(tr / "small_3_CT_abdomen.png", img)
    png(trm / "small_3_CT_abdomen_liver.png", m1[:32, :32])  # mask size differs from its image
    png(tr / "empty_4_CT_abdomen.png", img)
    png(trm / "empty_4_CT_abdomen_liver.png", np.zeros((64, 64), np.uint8))
    deep = (np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) * 16)  # 16-bit grey image
    png(te / "deep_5_MRI_brain.png", deep)
    assert Image.open(te / "deep_5_MRI_brain.png").mode.startswith("I;16")
    soft = np.zeros((64, 64), np.uint8)
    soft[20:40, 20:40], soft[19, 20:40] = 255, 128  # non-binary (anti-aliased) mask
    png(tem / "deep_5_MRI_brain_glioma.png", soft)
    rgba = np.dstack([img, np.full((64, 64), 128, np.uint8)])
    png(te / "alpha_6_MRI_brain.png", rgba)
    assert Image.open(te / "alpha_6_MRI_brain.png").mode == "RGBA"
    png(tem / "alpha_6_MRI_brain_glioma.png", soft)
    png(tem / "orphan_7_MRI_brain_glioma.png", soft)  # a mask whose image is missing
    png(te / "lonely_8_MRI_brain.png", img)  # an image without a mask
    out = tmp_path / "out"
    run(out, "--source", "biomedparse", "--bmp-root", str(root), "--questions-per-image", "6")
    samples, rejects = read_jsonl(out / "samples.jsonl"), read_jsonl(out / "rejects.jsonl")
    present = {(s["meta"]["file"], s["meta"]["present_target"]) for s in samples}
    assert present == {("train_mask/case_1_CT_abdomen_liver.png", "liver"),
                       ("train_mask/case_1_CT_abdomen_left+kidney.png", "left kidney"),
                       ("test_mask/deep_5_MRI_brain_glioma.png", "glioma"),
                       ("test_mask/alpha_6_MRI_brain_glioma.png", "glioma")}
    assert len(samples) == 4 * 6
    case1 = [s for s in samples if "case-1" in s["id"]]
    assert {s["modality"] for s in case1} == {"CT"} and {s["meta"]["site"] for s in case1} == {"abdomen"}
    assert len({s["image"] for s in case1}) == 1 and len({s["mask"] for s in case1}) == 2
    # the left kidney sits in the lower right: its name must not trip the spatial check
    kid = [s for s in case1 if s["meta"]["present_target"] == "left kidney" and s["question_type"] == "location"]
    assert kid and "lower right part of the image" in kid[0]["answer"]
    glioma = [s for s in samples if s["meta"]["present_target"] == "glioma"]
    assert {s["target_type"] for s in glioma if not s["meta"]["negative"]} == {"tumor"}
    for s in glioma:
        im, mk = Image.open(out / s["image"]), np.array(Image.open(out / s["mask"]))
        assert im.mode in ("L", "RGB") and set(np.unique(mk)) == {0, 255}
        assert ((mk > 0) == (soft > 0)).all()  # binarised > 0: the 128 row is kept
    deep_png = np.array(Image.open(out / next(s for s in glioma if "deep" in s["id"])["image"]))
    assert deep_png.dtype == np.uint8 and deep_png.min() == 0 and deep_png.max() == 255
    reasons = {r["id"]: " ".join(r["reasons"]) for r in rejects}
    expect = {"trunc-2": "unreadable_image", "small-3": "size_mismatch", "empty-4": "empty_mask",
              "orphan-7": "no_image", "lonely-8": "no_mask"}
    for key, why in expect.items():
        assert any(key in rid and why in r for rid, r in reasons.items()), (key, reasons)


def test_biomedparse_parent_folder_reads_every_subset(tmp_path):
    for sub in ("SubA", "SubB"):
        img, m = np.full((32, 32), 60, np.uint8), np.zeros((32, 32), np.uint8)
        m[4:20, 4:20] = 1
        png(tmp_path / "BMP" / sub / "train" / "x_1_X-Ray_chest.png", img)
        png(tmp_path / "BMP" / sub / "train_mask" / "x_1_X-Ray_chest_lung.png", m)
    stats = run(tmp_path / "o", "--source", "biomedparse", "--bmp-root", str(tmp_path / "BMP"))
    assert stats["by_subset"] == {"SubA": 1, "SubB": 1} and stats["by_modality"] == {"X-Ray": 2}


def test_biomedparse_broken_folder_is_a_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="empty.*train/"):
        run(tmp_path / "o", "--source", "biomedparse", "--bmp-root", str(tmp_path / "empty"))


# ----------------------------------------------------------------------------- phantoms
def thirds(x):
    return 0 if x < 1 / 3 else 2 if x > 2 / 3 else 1


def test_phantom_answers_match_the_pixels(tmp_path):
    args = P.get_args(["--out", str(tmp_path), "--questions-per-image", "6"])
    combos = set()
    for i in range(60):
        case = phantom_case(i, 7, 128)
        img, mask = case["image"].astype(float), case["mask"]
        lum = img.mean(axis=2) if img.ndim == 3 else img
        ys, xs = np.nonzero(mask)
        h = ["left", "central", "right"][thirds((xs.mean() + 0.5) / 128)]
        v = ["upper", "middle", "lower"][thirds((ys.mean() + 0.5) / 128)]
        # surroundings: a band 3..8 px outside the target, computed here without the script's helpers
        yy, xx = np.mgrid[0:128, 0:128]
        dist = np.min([np.hypot(yy - y, xx - x) for y, x in zip(ys[::7], xs[::7])], axis=0)
        band = (dist > 3) & (dist < 8) & ~mask
        brighter = lum[mask].mean() > lum[band].mean()
        drawn = case["meta"]["drawn"]
        assert brighter == (drawn["brightness"] == "brighter")
        facts = F.measure(case["image"], mask)
        for s in P.samples_for(case, args):
            out = json.loads(P.geometry_teacher(case, s, facts, [], args))
            ans = out["final_answer"]
            text = " ".join([ans] + out["reasoning_chain"])
            if s["question_type"] == "location":
                region = "central part" if (v, h) == ("middle", "central") else f"{v} {h} part"
                assert f"in the {region} of the image" in ans
            if s["question_type"] == "location_choice":
                assert f"in the {h} part of the image" in ans
            if s["question_type"] in ("describe", "reasoning"):
                assert ("brighter" if brighter else "darker") in text
                for key in ("shape", "size") + (("boundary",) if s["question_type"] == "describe" else ()):
                    assert drawn[key] in text, (key, drawn, text)
                if s["question_type"] == "reasoning":  # the rule's position finding: the vertical third
                    assert f"lies in the {v} part of the image" in text
                if s["question_type"] == "describe":
                    combos.add((v, h, drawn["shape"], drawn["size"], drawn["boundary"], drawn["brightness"]))
            if s["question_type"] == "yesno":
                assert ans.startswith("No") == s["negative"]
                if s["negative"]:  # negatives ask about a target of that modality that is absent
                    assert s["target"] != case["target"] and s["target"] in [t for t, _ in case["others"]]
            assert G.gate(json.dumps(out), s, facts)[1] == []
    # describe answers need several facts at once: many different attribute combinations occur
    assert len(combos) >= 8


def test_grading_rule_needs_every_finding(tmp_path):
    """The reasoning question: one point each for irregular, upper part, large, darker, counted by hand here from
    the measured facts; the answer leads with the grade, each step states one finding, the last the sum."""
    args = P.get_args(["--out", str(tmp_path), "--types", "reasoning"])
    grade = {0: "Low", 1: "Low", 2: "Intermediate", 3: "High", 4: "High"}
    totals = set()
    for i in range(40):
        case = phantom_case(i, 11, 96)
        facts = F.measure(case["image"], case["mask"])
        (s,) = list(P.samples_for(case, args))
        assert s["question_type"] == "reasoning" and "one point each" in s["question"]
        out = json.loads(P.geometry_teacher(case, s, facts, [], args))
        f = facts  # what the pixels show (the drawn size of a thin vessel can measure small)
        n = (f["shape"] == "irregular") + (f["v"] == "upper") + (f["size"] == "large") + \
            (f["brightness"] == "darker")
        totals.add(n)
        assert out["final_answer"] == f"{grade[n]} grade: {n} of 4 points."
        chain = out["reasoning_chain"]
        assert len(chain) in (3, 4) and f"{n} point" in chain[-1] and grade[n].lower() in chain[-1]
        assert chain[0].startswith("Its shape is " + f["shape"]) and f"in the {f['v']} part" in chain[1]
        assert G.gate(json.dumps(out), s, facts)[1] == []
        choices, k = P.closed_form(s, facts, case, s["rng"])
        assert sorted(choices) == sorted(f"{grade[m]} grade: {m} of 4 points." for m in range(5))
        assert choices[k] == out["final_answer"]
    assert len(totals) >= 4  # the rule's totals vary: no constant answer scores


def test_phantom_run_schema_splits_and_choices(tmp_path):
    stats = run(tmp_path, "--n", "120", "--questions-per-image", "6")
    rows = read_jsonl(tmp_path / "samples.jsonl")
    keys = {"id", "source", "subset", "modality", "target", "target_type", "image", "mask", "overlay", "question",
            "question_type", "answer", "reasoning_chain", "latent_steps", "split", "meta"}
    assert len(rows) == 720 and stats["samples"] == 720 and stats["rejects"] == 0
    assert stats["by_question_type"] == {q: 120 for q in sorted(G.QUESTION_TYPES)}
    assert stats["yesno_negative"] == 60  # balanced yes/no
    for r in rows:  # the closed form in every split (train.py --options-rate asks with it too)
        assert set(r) == keys | {"choices", "answer_index"}
        lo, hi = G.STEP_RANGE[r["question_type"]]
        assert r["latent_steps"] == len(r["reasoning_chain"]) and lo <= r["latent_steps"] <= hi
        assert r["answer"].endswith(".") and os.path.exists(tmp_path / r["overlay"])
        assert len(r["choices"]) >= 2 and len(set(r["choices"])) == len(r["choices"])
        assert r["choices"][r["answer_index"]] == r["answer"]  # the geometry teacher's answer is an option
    # a rerun into a new folder writes the same bytes (choices drawn from each sample's own seeded RNG)
    run(tmp_path / "again", "--n", "120", "--questions-per-image", "6")
    assert (tmp_path / "again" / "samples.jsonl").read_bytes() == (tmp_path / "samples.jsonl").read_bytes()
    # one phantom image never straddles splits; the split is a pure function of the id
    by_image = {}
    for r in rows:
        by_image.setdefault(r["image"], set()).add(r["split"])
    assert all(len(v) == 1 for v in by_image.values())
    assert 0.05 < stats["by_split"].get("test", 0) / 720 < 0.3 and stats["by_split"]["train"] > 400
    # the overlay is the teacher view: red-tinted inside the mask, yellow on the boundary
    r = rows[0]
    ov, mk = np.array(Image.open(tmp_path / r["overlay"])).astype(int), np.array(Image.open(tmp_path / r["mask"])) > 0
    assert (ov == [255, 255, 0]).all(axis=2).sum() > 0 and (ov[mk][:, 0] >= ov[mk][:, 1]).all()


def test_captions_name_no_target_and_match_the_pixels(tmp_path):
    stats = run(tmp_path, "--n", "40", "--seed", "3", "--captions", "--test-frac", "0", "--val-frac", "0")
    rows = read_jsonl(tmp_path / "samples.jsonl")
    assert stats["by_question_type"] == {"caption": 40} and stats["rejects"] == 0
    assert {r["split"] for r in rows} == {"train"}
    assert not any("choices" in r for r in rows)  # a caption has no closed form
    for r in rows:
        case = phantom_case(int(r["image"].split("-")[-1][:-4]), 3, 128)
        drawn, facts = case["meta"]["drawn"], r["meta"]["facts"]
        assert r["question"].startswith("Describe this ") and r["target"] not in r["question"] + r["answer"]
        assert f"{facts['h']} part of the image" in r["answer"] and r["reasoning_chain"] == [r["answer"]]
        for key in ("shape", "size", "boundary", "brightness"):
            assert drawn[key] in r["answer"], (key, drawn, r["answer"])
    # the same seed and folder then takes the six question types too, on the same images (appended)
    run(tmp_path, "--n", "40", "--seed", "3", "--questions-per-image", "2", "--test-frac", "0", "--val-frac", "0")
    rows = read_jsonl(tmp_path / "samples.jsonl")
    assert len(rows) == 120 and len({r["image"] for r in rows}) == 40
    assert all(("choices" in r) == (r["question_type"] != "caption") for r in rows)  # train items: choices


# ----------------------------------------------------------------------------- quality gate
FACTS_LEFT = {"cx": 0.2, "cy": 0.8, "h": "left", "v": "lower"}


def sample(qtype="describe", target="liver", ttype="organ", negative=False):
    return {"question_type": qtype, "target": target, "target_type": ttype, "negative": negative}


def gate(answer, chain, **kw):
    return G.gate(json.dumps({"final_answer": answer, "reasoning_chain": chain}), sample(**kw), FACTS_LEFT)


def test_gate_rules_accept_good_and_reject_bad():
    good = gate("The liver is a large, smooth organ in the lower left part of the image.",
                ["A large homogeneous structure fills the lower left part of the image.", "Its edges are smooth."])
    assert good[1] == [] and good[0]["final_answer"].endswith("image.")
    # round 1: JSON schema
    assert G.gate("```json {}```", sample(), FACTS_LEFT)[1][0].startswith("json")
    assert G.gate(json.dumps({"final_answer": "x", "reasoning_chain": ["a"], "note": 1}), sample(), FACTS_LEFT)[1][0].startswith("json")
    assert gate("x", "not a list")[1][0].startswith("json")
    # round 2: forbidden annotation terms, on word boundaries
    assert gate("The masked area is liver.", ["The red overlay shows it.", "ok"])[1][:2] == \
        ["leak: forbidden term 'masked'", "leak: forbidden term 'red overlay'"]
    assert any("roi" in r for r in gate("Liver.", ["The ROI is smooth.", "Fine."])[1])
    assert gate("Liver after steroid use is smooth.", ["Smooth mass-free relabelling-free edges.", "Fine."],
                ttype="tumor")[1] == []  # 'steroid' is not 'roi', 'mass-free' is fine for a tumor target
    # round 3: pathology words only for normal organs
    assert any(r.startswith("pathology") for r in gate("A lesion in the liver.", ["A lesion.", "x"])[1])
    assert gate("A lesion in the liver.", ["A lesion.", "x"], target="liver tumor", ttype="tumor")[1] == []
    # round 4: patient-space wording
    assert any(r.startswith("mixed_space") for r in gate("It is on the patient's left.", ["a", "b"])[1])
    assert any(r.startswith("mixed_space") for r in gate("Anatomical right lobe.", ["a", "b"])[1])
    # round 5: step count
    assert any(r.startswith("steps") for r in gate("Fine.", ["only one"], qtype="location")[1])
    assert any(r.startswith("steps") for r in gate("Fine.", ["1", "2", "3", "4"], qtype="describe")[1])
    # spatial consistency with the centroid (left, lower); a target name is not a claim
    assert any(r.startswith("spatial") for r in gate("It is in the right part of the image.", ["a", "b"])[1])
    assert any(r.startswith("spatial") for r in gate("Fine.", ["It lies in the upper half.", "b"])[1])
    assert gate("The left kidney is in the lower left.", ["a", "b"], target="left kidney")[1] == []
    assert any(r.startswith("spatial") for r in gate("The right kidney is on the right.", ["a", "b"], target="right kidney")[1])
    # yes/no answers must agree with the truth
    assert any(r.startswith("yesno") for r in gate("Yes, it is visible.", ["a"], qtype="yesno", negative=True)[1])
    assert gate("No, it is not visible.", ["a"], qtype="yesno", negative=True)[1] == []
    # round 6: normalisation
    assert gate("kidney", ["a"], qtype="identify", target="kidney")[0]["final_answer"] == "The structure shown is the kidney."
    assert gate("Lower left", ["a"], qtype="location_choice")[0]["final_answer"] == \
        "The liver is in the lower left part of the image."
    assert gate("The liver lies low on the left side", ["a", "b"], qtype="location")[0]["final_answer"] == \
        "The liver lies low on the left side in the image."
    assert gate("It is smooth!", ["a", "b"])[0]["final_answer"] == "It is smooth."


# ----------------------------------------------------------------------------- OpenAI teacher (loopback)
class FakeTeacher(BaseHTTPRequestHandler):
    """Speaks chat-completions; the answer script is chosen by the question type in the prompt."""
    script, requests = {}, []

    def log_message(self, *a):
        pass

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        text = body["messages"][1]["content"][0]["text"]
        qtype = text.split("Question type: ")[1].split("\n")[0]
        target = text.split("Target (teacher-only): ")[1].split("\n")[0]
        FakeTeacher.requests.append({"path": self.path, "auth": self.headers["Authorization"], "body": body,
                                     "qtype": qtype, "text": text, "t": time.time()})
        step = FakeTeacher.script[qtype].pop(0) if len(FakeTeacher.script[qtype]) > 1 else FakeTeacher.script[qtype][0]
        if isinstance(step, int):
            self.send_response(step)
            self.end_headers()
            return
        content = step.replace("TARGET", target) if isinstance(step, str) else None
        payload = {"choices": [{"message": {"role": "assistant", "content": content}}]} if content else step
        data = json.dumps(payload).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


def answer(final, chain):
    return json.dumps({"final_answer": final, "reasoning_chain": chain})


def test_openai_teacher_against_loopback_server(tmp_path, monkeypatch):
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeTeacher)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/v1"
    FakeTeacher.requests = []
    FakeTeacher.script = {
        "yesno": [500, 503, answer("Yes, the TARGET is visible.", ["A distinct elongated structure is seen."])],
        "identify": [answer("TARGET", ["The mask shows it."]), answer("TARGET", ["Its irregular outline fits."])],
        "location_choice": ["not json", answer("In the image.", ["a", "b"]), {"unexpected": "reply"},
                            "```json\n{}\n```", answer("x", [])],
        "location": [500],  # the endpoint never recovers: not a decision, retried on the next run
    }
    monkeypatch.setenv("VITAL_TEST_KEY", "sk-test-secret-123")
    argv = ["--n", "4", "--teacher", "openai", "--base-url", url, "--teacher-model", "fake-vlm",
            "--api-key-env", "VITAL_TEST_KEY", "--backoff-base", "0.05", "--backoff-max", "0.1",
            "--http-retries", "3", "--timeout", "5", "--workers", "3"]  # concurrent requests
    t0 = time.time()
    # location's endpoint never recovers: after the bounded retries the run stops, one line naming the URL
    with pytest.raises(SystemExit, match=f"teacher at {url}/chat/completions is unreachable after 3 retries "
                                         r"\(last: HTTP 500\); stopped: 2 accepted and 1 rejected"):
        run(tmp_path, *argv)
    assert time.time() - t0 < 10  # backoff is bounded
    samples, rejects = read_jsonl(tmp_path / "samples.jsonl"), read_jsonl(tmp_path / "rejects.jsonl")
    by_type = {s["question_type"]: s for s in samples}
    assert set(by_type) == {"yesno", "identify"} and [r["question_type"] for r in rejects] == ["location_choice"]
    assert "unreachable" in json.load(open(tmp_path / "stats.json"))["last_run"]["stopped"]
    assert by_type["yesno"]["answer"].startswith("Yes") and by_type["yesno"]["meta"]["gate_retries"] == []
    # identify: leaked once, fixed after a strict retry, short answer normalised into a sentence
    ident = by_type["identify"]
    assert ident["meta"]["gate_retries"] == ["leak: forbidden term 'mask'"]
    assert ident["answer"] == f"The structure shown is {G.article(ident['target'], ident['target_type'])} {ident['target']}."
    reqs = {q: [r for r in FakeTeacher.requests if r["qtype"] == q] for q in FakeTeacher.script}
    assert "STRICT RULES" not in reqs["identify"][0]["text"]
    assert "STRICT RULES" in reqs["identify"][1]["text"] and "leak: forbidden term 'mask'" in reqs["identify"][1]["text"]
    assert len(reqs["yesno"]) == 3 and len(reqs["location"]) == 4  # 1 + 3 HTTP retries
    gaps = np.diff([r["t"] for r in reqs["location"]])  # exponential backoff 0.05, 0.1, capped at 0.1
    assert 0.04 < gaps[0] and 0.09 < gaps[1] and 0.09 < gaps[2] and gaps.max() < 1.5
    # 1 + 4 gate retries, then a reject listing every reason
    assert len(reqs["location_choice"]) == 5 and rejects[0]["attempts"] == 5
    assert [x.split(":")[0] for x in rejects[0]["reasons"]][:2] == ["json", "steps"] and len(rejects[0]["reasons"]) == 5
    # the protocol: endpoint path, key header, system prompt of §A.2, overlay as a base64 PNG data URL
    r = FakeTeacher.requests[0]
    assert r["path"] == "/v1/chat/completions" and r["auth"] == "Bearer sk-test-secret-123"
    assert r["body"]["model"] == "fake-vlm"
    system = r["body"]["messages"][0]["content"]
    for must in ("final_answer", "reasoning_chain", "patient-left", "overlays", "image space", "Teacher-only"):
        assert must in system
    assert "exactly 1 reasoning step" in r["text"] and "Example of the output style" in r["text"]
    data_url = r["body"]["messages"][1]["content"][1]["image_url"]["url"]
    assert data_url.startswith("data:image/png;base64,")
    ov = np.array(Image.open(io.BytesIO(base64.b64decode(data_url.split(",", 1)[1]))).convert("RGB")).astype(int)
    assert (ov == [255, 255, 0]).all(axis=2).any()  # the teacher sees the overlay, not the raw image
    # the key is never written anywhere
    for name in ("samples.jsonl", "rejects.jsonl", "stats.json"):
        assert "sk-test-secret" not in (tmp_path / name).read_text()
    # rerun after the endpoint recovers: only the failed sample is asked again
    FakeTeacher.script["location"] = [answer("The TARGET is in the image.", ["It is seen.", "It lies there."])]
    n_before = len(FakeTeacher.requests)
    stats = run(tmp_path, *argv)
    assert [r["qtype"] for r in FakeTeacher.requests[n_before:]] == ["location"]
    assert stats["samples"] == 3 and stats["rejects"] == 1
    server.shutdown()


class KeyedTeacher(BaseHTTPRequestHandler):
    """A teacher that checks the key: `refuse` (401 or 403) for any other key; otherwise a gate-proof
    answer with the type's smallest step count, or HTTP 400 for the question type in `bad_request`."""
    key, refuse, bad_request, requests = "good-key", 401, None, []

    def log_message(self, *a):
        pass

    def reply(self, code, payload):
        data = json.dumps(payload).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self):
        text = json.loads(self.rfile.read(int(self.headers["Content-Length"])))["messages"][1]["content"][0]["text"]
        qtype = text.split("Question type: ")[1].split("\n")[0]
        KeyedTeacher.requests.append(qtype)
        if self.headers["Authorization"] != f"Bearer {KeyedTeacher.key}":
            return self.reply(KeyedTeacher.refuse, {"error": {"message": "Incorrect API key provided"}})
        if qtype == KeyedTeacher.bad_request:
            return self.reply(400, {"error": {"message": "image too large for this model"}})
        final = ("No, it is not visible." if "correct answer is No" in text else "Yes, it is visible.") \
            if qtype == "yesno" else "It is seen in the image."
        content = answer(final, ["A distinct structure is seen."] * G.STEP_RANGE[qtype][0])
        self.reply(200, {"choices": [{"message": {"role": "assistant", "content": content}}]})


@pytest.fixture
def keyed_teacher():
    KeyedTeacher.key, KeyedTeacher.refuse, KeyedTeacher.bad_request, KeyedTeacher.requests = \
        "good-key", 401, None, []
    server = ThreadingHTTPServer(("127.0.0.1", 0), KeyedTeacher)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()


def openai_argv(url, n):
    return ["--n", str(n), "--teacher", "openai", "--base-url", url, "--api-key-env", "VITAL_TEST_KEY",
            "--backoff-base", "0.01", "--backoff-max", "0.02", "--http-retries", "2", "--timeout", "5"]


@pytest.mark.parametrize("code", [401, 403])
def test_refused_key_stops_at_once_and_the_rerun_continues(tmp_path, monkeypatch, keyed_teacher, code):
    KeyedTeacher.refuse = code
    monkeypatch.setenv("VITAL_TEST_KEY", "good-key")
    run(tmp_path, *openai_argv(keyed_teacher, 2))
    assert len(read_jsonl(tmp_path / "samples.jsonl")) == 2
    monkeypatch.setenv("VITAL_TEST_KEY", "sk-wrong-key")
    KeyedTeacher.requests = []
    with pytest.raises(SystemExit) as e:
        run(tmp_path, *openai_argv(keyed_teacher, 6))
    msg = str(e.value)
    assert msg.count("\n") == 0 and "sk-wrong-key" not in msg
    assert f"teacher at {keyed_teacher}/chat/completions refused the key in $VITAL_TEST_KEY (HTTP {code})" in msg
    assert "stopped: 0 accepted and 0 rejected" in msg and "rerun the same command" in msg
    assert len(KeyedTeacher.requests) == 1  # at once: no retry, no other sample asked
    assert len(read_jsonl(tmp_path / "samples.jsonl")) == 2 and not read_jsonl(tmp_path / "rejects.jsonl")
    assert "refused the key" in json.load(open(tmp_path / "stats.json"))["last_run"]["stopped"]
    monkeypatch.setenv("VITAL_TEST_KEY", "good-key")
    KeyedTeacher.requests = []
    stats = run(tmp_path, *openai_argv(keyed_teacher, 6))
    assert len(KeyedTeacher.requests) == 4 and stats["samples"] == 6  # only the 4 undecided were asked


def test_missing_key_is_checked_before_any_work(tmp_path, monkeypatch, keyed_teacher):
    monkeypatch.delenv("VITAL_TEST_KEY", raising=False)
    with pytest.raises(SystemExit, match=r"reads its key from \$VITAL_TEST_KEY, which is not set"):
        run(tmp_path / "o", *openai_argv(keyed_teacher, 3))
    assert KeyedTeacher.requests == [] and not (tmp_path / "o").exists()


def test_unreachable_endpoint_ends_non_zero_naming_the_url(tmp_path, monkeypatch, keyed_teacher):
    import socket
    with socket.socket() as s:  # a port nobody listens on: connection refused
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}/v1"
    monkeypatch.setenv("VITAL_TEST_KEY", "good-key")
    run(tmp_path, *openai_argv(keyed_teacher, 2))
    with pytest.raises(SystemExit) as e:
        run(tmp_path, *openai_argv(dead, 5))
    msg = str(e.value)
    assert msg.count("\n") == 0 and msg.startswith("prepare_data.py: error: ")
    assert f"teacher at {dead}/chat/completions is unreachable after 2 retries" in msg and "refused" in msg
    assert len(read_jsonl(tmp_path / "samples.jsonl")) == 2  # nothing lost
    stats = run(tmp_path, *openai_argv(keyed_teacher, 5))  # the endpoint is back: the rerun continues
    assert stats["samples"] == 5 and stats["last_run"]["skipped_already_decided"] == 2


def test_a_request_the_endpoint_refuses_is_retried_then_rejected(tmp_path, monkeypatch, keyed_teacher):
    KeyedTeacher.bad_request = "location"
    monkeypatch.setenv("VITAL_TEST_KEY", "good-key")
    stats = run(tmp_path, *openai_argv(keyed_teacher, 4), "--max-retries", "1")
    rejects = read_jsonl(tmp_path / "rejects.jsonl")
    assert stats["samples"] == 3 and [r["question_type"] for r in rejects] == ["location"]
    assert rejects[0]["reasons"] == ["http: the endpoint answered HTTP 400 "
                                     '({"error": {"message": "image too large for this model"}})'] * 2
    assert KeyedTeacher.requests.count("location") == 2  # 1 + --max-retries, no HTTP retries on a 400


# ----------------------------------------------------------------------------- crash safety
def test_kill_and_rerun_loses_nothing_and_duplicates_nothing(tmp_path):
    cmd = [sys.executable, os.path.join(ROOT, "prepare_data.py"), "--n", "200", "--workers", "2"]
    ref = tmp_path / "ref"
    subprocess.run(cmd + ["--out", str(ref)], check=True, capture_output=True)
    crash = tmp_path / "crash"
    proc = subprocess.Popen(cmd + ["--out", str(crash)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    path = crash / "samples.jsonl"
    while proc.poll() is None and (not path.exists() or path.read_text().count("\n") < 40):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    written = path.read_text().count("\n")
    assert 40 <= written < 200  # it really died mid-way
    with open(path, "a") as fh:
        fh.write('{"id": "phantom-s0-000999--half')  # what a kill during a write leaves behind
    subprocess.run(cmd + ["--out", str(crash)], check=True, capture_output=True)
    a, b = read_jsonl(ref / "samples.jsonl"), read_jsonl(crash / "samples.jsonl")
    assert len(b) == len({r["id"] for r in b}) == 200
    assert sorted(a, key=lambda r: r["id"]) == sorted(b, key=lambda r: r["id"])  # identical records
    r = a[123]
    for k in ("image", "mask", "overlay"):
        assert (ref / r[k]).read_bytes() == (crash / r[k]).read_bytes()
    # a broken line that is not the last one is an error naming the file and the line
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:5] + ["{broken\n"] + lines[5:]))
    with pytest.raises(SystemExit, match="samples.jsonl line 6"):
        P.load_decided(str(path))
