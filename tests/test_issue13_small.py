"""Issue 13's small items: weights loaded onto the device, §C.6 on the in-domain set (in test_evaluate.py),
the spatial gate judging only the target, BiomedParse splits by patient/volume and by its own folders."""
import json
import os

import numpy as np
import pytest
import torch
import transformers

import model as M

import pipeline_io as IO
import prepare_data as P
from embedded.tiny import make_tiny
from tests.test_prepare_data import png, read_jsonl, run


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return str(make_tiny(str(tmp_path_factory.mktemp("tiny"))))


LOADERS = [(IO.load_backbone, "backbone", transformers.Qwen3VLForConditionalGeneration),
           (IO.load_decoder, "decoder", transformers.Qwen3ForCausalLM), (IO.load_encoder, "encoder", transformers.SiglipVisionModel)]


@pytest.mark.parametrize("load,sub,cls", LOADERS)
def test_cpu_loading_is_bit_identical_to_a_plain_from_pretrained(tiny, load, sub, cls):
    model = load(os.path.join(tiny, sub), device="cpu")[0]
    ref = cls.from_pretrained(os.path.join(tiny, sub), dtype=torch.float32)  # the loading before issue 13
    got, want = model.state_dict(), ref.state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert {p.device.type for p in model.parameters()} == {"cpu"}


@pytest.mark.parametrize("load,sub,cls", LOADERS)
def test_weights_go_straight_to_the_device(tiny, load, sub, cls, monkeypatch):
    """Off the CPU, from_pretrained gets device_map={"": device} (no host copy first, no .to()); "meta"
    stands in for a GPU here: the parameters arrive there without being moved."""
    calls = []
    real = cls.from_pretrained.__func__
    monkeypatch.setattr(cls, "from_pretrained", classmethod(lambda c, *a, **kw: calls.append(kw) or real(c, *a, **kw)))
    monkeypatch.setattr(torch.nn.Module, "to", lambda *a, **kw: pytest.fail("moved after loading"))
    model = load(os.path.join(tiny, sub), device="meta")[0]
    assert calls[-1]["device_map"] == {"": torch.device("meta")}
    assert {p.device.type for p in model.parameters()} == {"meta"}


# ----------------------------------------------------------------------------- the spatial gate
FACTS = {"cx": 0.2, "cy": 0.8, "h": "left", "v": "lower"}  # the target: lower left


def gate(answer, chain, target="spleen"):
    sample = {"question_type": "location", "target": target, "target_type": "organ", "negative": False}
    return P.gate(json.dumps({"final_answer": answer, "reasoning_chain": chain}), sample, FACTS)[1]


def test_gate_lets_sentences_about_neighbours_pass():
    assert gate("The spleen is in the lower left part of the image.",
                ["The liver lies to the right of the stomach, in the upper right part of the image.",
                 "The spleen sits below it, and the kidney lies to the left of the spleen."]) == []
    assert gate("The spleen is in the lower left part of the image.",  # a relation, not a position
                ["A small structure lies in the lower left.", "It lies left of the liver and right of the ribs."]) == []


def test_gate_still_rejects_a_wrong_side_about_the_target():
    wrong = "spatial: says 'right' but the target's center is at x=0.20, y=0.80"
    assert gate("The spleen is in the lower right part of the image.", ["a", "b"]) == [wrong]  # final answer
    assert gate("The spleen is in the lower left.", ["The liver is large, and the spleen is on the right.",
                                                     "b"]) == [wrong]                           # names the target
    assert gate("The spleen is in the lower left.", ["A bright structure is seen.",
                                                     "Its center lies in the right third of the image."]) == [wrong]
    assert gate("The spleen is in the lower left.", ["A structure fills the upper half.", "b"])[0].startswith(
        "spatial: says 'upper'")                                                                 # unnamed structure


# ----------------------------------------------------------------------------- BiomedParse splits
def test_bmp_group_drops_the_slice_index_only():
    assert P.bmp_group("amos_0042_117") == "amos_0042"
    assert P.bmp_group("LIDC-IDRI_0001_12") == "LIDC-IDRI_0001"
    assert P.bmp_group("ISIC_0000123") == "ISIC_0000123"  # two parts: one image, its own group
    assert P.bmp_group("case_7_a") == "case_7_a" and P.bmp_group("img7") == "img7"


def test_bmp_splits_follow_patients_and_biomedparse_folders(tmp_path):
    root, img, m = tmp_path / "MyCT", np.full((32, 32), 90, np.uint8), np.zeros((32, 32), np.uint8)
    img[4:20, 4:20], m[4:20, 4:20] = 200, 255
    for split, patients in (("train", range(12)), ("test", range(100, 103))):
        for p in patients:
            for z in range(3):  # three slices of each patient's volume
                png(root / split / f"vol_{p:04d}_{z}_CT_abdomen.png", img)
                png(root / f"{split}_mask" / f"vol_{p:04d}_{z}_CT_abdomen_liver.png", m)
    run(tmp_path / "o", "--source", "biomedparse", "--bmp-root", str(root), "--questions-per-image", "1",
        "--test-frac", "0.5", "--val-frac", "0.3")
    rows = read_jsonl(tmp_path / "o" / "samples.jsonl")
    assert len(rows) == 15 * 3
    by_patient = {}
    for r in rows:
        folder, patient = r["meta"]["image_file"].split("/")[0], r["meta"]["image_file"].split("_")[1]
        assert (r["split"] == "test") == (folder == "test")  # the folder decides test, whatever the hash
        by_patient.setdefault(patient, set()).add(r["split"])
    assert all(len(s) == 1 for s in by_patient.values())  # one patient, one split
    assert {s for v in by_patient.values() for s in v} == {"train", "val", "test"}
