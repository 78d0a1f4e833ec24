"""BiomedParse splits: a patient or volume never straddles splits (the slice index is dropped from the name),
and BiomedParse's own test/ folder is the test split."""
import numpy as np

from pipeline import segmentation_sources as S
from tests.test_prepare_data import png, read_jsonl, run


def test_bmp_group_drops_the_slice_index_only():
    assert S.bmp_group("amos_0042_117") == "amos_0042"
    assert S.bmp_group("LIDC-IDRI_0001_12") == "LIDC-IDRI_0001"
    assert S.bmp_group("ISIC_0000123") == "ISIC_0000123"  # two parts: one image, its own group
    assert S.bmp_group("case_7_a") == "case_7_a" and S.bmp_group("img7") == "img7"


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
