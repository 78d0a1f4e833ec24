"""The bad-input corpus, built here in temporary folders. Each kind of bad input goes through the
stage that reads it and gets exactly its expected outcome: accepted, a reject that names the file and says
what is wrong, or a one-line error (no traceback, non-zero exit). Nothing else is lost: every input file ends
in exactly one place, and a rerun changes nothing. Last, every JSON/JSONL artifact of a phantom pipeline run
(prepare, ROI, train, evaluate, explain) parses with a strict parser (no NaN, no Infinity).

Each stage test prints its tally (`pytest -s`): kinds tried and their outcomes."""
import json
import os
import struct
import subprocess
import sys
import zlib
from collections import Counter

import numpy as np
import pytest
from PIL import Image

import evaluate as E
import explain as X
import extract_roi as ER
from pipeline import image_facts as F
import model as M
from pipeline import io as IO
import prepare_data as P

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, OMP_NUM_THREADS="1")


def strict_loads(text):
    def refuse(name):
        raise AssertionError(f"bare {name} in a JSON artifact")
    return json.loads(text, parse_constant=refuse)


def strict_jsonl(path):
    with open(path) as f:
        return [strict_loads(line) for line in f if line.strip()]


def tally(stage, outcomes):
    """Print the stage's corpus as 'N kinds: outcome x count, ...' (a summary for the log)."""
    counts = Counter(outcomes.values())
    print(f"\n{stage}: {len(outcomes)} kinds -> " + ", ".join(f"{k} x{n}" for k, n in sorted(counts.items())))


def one_line_error(fn, exc=SystemExit):
    """Run fn, expect `exc`; -> its message, which must be one line."""
    with pytest.raises(exc) as e:
        fn()
    msg = str(e.value)
    assert msg and "\n" not in msg and "Traceback" not in msg, msg
    return msg


# ----------------------------------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------------------------------
def png(path, array):
    """array: a numpy array, or a PIL image (e.g. a palette image) saved as it is."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    (array if isinstance(array, Image.Image) else Image.fromarray(array)).save(path)


def truncate(path):
    data = open(path, "rb").read()
    open(path, "wb").write(data[:len(data) // 2])


def bomb_png(path, w=20000, h=10000):
    """A valid 1x1 PNG whose header claims w x h pixels: PIL refuses it (decompression bomb) before decoding."""
    png(path, np.zeros((1, 1), np.uint8))
    data = bytearray(open(path, "rb").read())
    data[16:24] = struct.pack(">II", w, h)  # IHDR width, height
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))  # CRC of 'IHDR' + its 13 bytes
    open(path, "wb").write(bytes(data))


def grey(h=64, w=64, box=(20, 40, 20, 40), seed=0):
    """A dark noisy image with a bright rectangle box = (y0, y1, x0, x1); -> (image, mask of the box)."""
    a = np.random.default_rng(seed).integers(40, 80, (h, w)).astype(np.uint8)
    m = np.zeros((h, w), bool)
    m[box[0]:box[1], box[2]:box[3]] = True
    a[m] = 200
    return a, m


def u8(mask):
    return mask.astype(np.uint8) * 255


# ----------------------------------------------------------------------------------------------------
# Stage 1, BiomedParse reader
# ----------------------------------------------------------------------------------------------------
def bmp_corpus(root):
    """One subset folder with one image (+ mask) per kind. -> {kind: expected outcome}, {kind: [its files]}."""
    tr, trm = os.path.join(root, "train"), os.path.join(root, "train_mask")
    expect, files = {}, {}
    img, sq = grey()

    def pair(kind, expected, image=img, mask=u8(sq)):
        ip, mp = os.path.join(tr, f"{kind}_CT_abdomen.png"), os.path.join(trm, f"{kind}_CT_abdomen_liver.png")
        if image is not None:
            png(ip, image)
        if mask is not None:
            png(mp, mask)
        expect[kind], files[kind] = expected, [p for p, a in ((ip, image), (mp, mask)) if a is not None]
        return ip, mp

    pair("good", "accepted")
    truncate(pair("truncated-image", "unreadable_image")[0])
    open(pair("not-an-image", "unreadable_image")[0], "w").write("this is a text file named .png")
    open(pair("zero-bytes", "unreadable_image")[0], "w").close()
    bomb_png(pair("bomb", "unreadable_image")[0])  # 200 M pixels claimed
    truncate(pair("truncated-mask", "unreadable_mask")[1])
    pair("size-mismatch", "size_mismatch", mask=u8(sq[:32, :48]))
    pair("empty-mask", "empty_mask", mask=np.zeros((64, 64), np.uint8))
    one = np.zeros((64, 64), np.uint8)
    one[31, 31] = 255
    pair("one-pixel", "too_small", mask=one)
    below, at = np.zeros((64, 64), np.uint8), np.zeros((64, 64), np.uint8)
    below[10:14, 10:16] = 255  # 24 px: one under MIN_TARGET_PIXELS
    at[10:15, 10:15] = 255  # 25 px: exactly MIN_TARGET_PIXELS
    pair("below-minimum", "too_small", mask=below)
    pair("at-minimum", "accepted", mask=at)
    corner, cm = grey(box=(0, 20, 44, 64))  # a target cut by the image's top and right edges
    pair("border", "accepted", image=corner, mask=u8(cm))
    pair("full", "too_large", mask=np.full((64, 64), 255, np.uint8))
    most = np.full((64, 64), 255, np.uint8)
    most[:7] = 0  # 3648 / 4096 = 89.1%: just under MAX_TARGET_SHARE, with a band of surroundings
    pair("under-maximum", "accepted", image=grey(box=(7, 64, 0, 64))[0], mask=most)
    nearly = np.full((64, 64), 255, np.uint8)
    nearly[:4] = 0  # 93.8%
    pair("nearly-full", "too_large", mask=nearly)
    speckled = np.full((64, 64), 255, np.uint8)
    speckled[::3, ::3] = 0  # 88.9%, but every background pixel is within 2 px of the target
    pair("speckled", "no_surroundings", mask=speckled)
    pair("16-bit", "accepted", image=img.astype(np.uint16) * 250)
    pair("rgba", "accepted", image=np.dstack([img, img, img, np.full_like(img, 90)]))
    pair("palette", "accepted", image=Image.fromarray(img).convert("P"))
    pair("rgb-mask", "accepted", mask=np.dstack([u8(sq), np.zeros_like(u8(sq)), np.zeros_like(u8(sq))]))
    soft = u8(sq) // 2
    soft[19, 20:40], soft[20:40, 40] = 1, 3  # anti-aliased halo, values 1..127
    pair("non-binary-mask", "accepted", mask=soft)
    pair("orphan-mask", "no_image", image=None)
    pair("image-without-mask", "no_mask", mask=None)
    wide, wm = grey(150, 2400, box=(40, 100, 1800, 2000))
    pair("huge-non-square", "accepted", image=wide, mask=u8(wm))
    for kind, folder, name in (("bad-mask-name", trm, "scan_liver.png"), ("bad-image-name", tr, "scan.png"),
                               ("not-png", tr, "x_CT_abdomen.jpg")):
        png(os.path.join(folder, name), img) if name.endswith(".png") else Image.fromarray(img).save(
            os.path.join(folder, name))
        expect[kind], files[kind] = "bad_name", [os.path.join(folder, name)]
    os.makedirs(os.path.join(tr, "nested_CT_abdomen.png"))  # a folder where an image should be
    expect["folder"], files["folder"] = "bad_name", [os.path.join(tr, "nested_CT_abdomen.png")]
    # hidden files are not inputs: skipped without a word
    open(os.path.join(tr, ".DS_Store"), "w").write("junk")
    open(os.path.join(trm, "._good_CT_abdomen_liver.png"), "wb").write(b"\x00\x05\x16\x07 apple double")
    return expect, files


def places_of(path, samples, rejects):
    """Where one input file ended: 'accepted' per sample that uses it, a reason kind per reject naming it."""
    out = [("accepted", s["id"]) for s in samples
           if path.endswith(("/" + s["meta"]["file"], "/" + s["meta"]["image_file"]))]
    return out + [(r["reasons"][0].split(":")[0], r["id"]) for r in rejects if path in " ".join(r["reasons"])]


def check_facts_and_words(s):
    """An accepted sample's facts are finite, its size word and its 'covers ...%' agree with the area."""
    f = s["meta"]["facts"]
    assert all(np.isfinite(v) for v in f.values() if isinstance(v, float)), f
    assert f["area"] <= F.MAX_TARGET_SHARE
    assert f["size"] == ("small" if f["area"] < 0.025 else "large")
    for step in s["reasoning_chain"]:
        if "covers" in step:
            assert f"covers {F.share_words(f['area'])} of the image" in step, (step, f["area"])
            assert f"so it is {f['size']}" in step


def test_biomedparse_corpus(tmp_path):
    root = str(tmp_path / "Corpus")
    expect, files = bmp_corpus(root)
    out = tmp_path / "out"
    argv = ["--source", "biomedparse", "--bmp-root", root, "--out", str(out), "--workers", "1",
            "--questions-per-image", "6", "--test-frac", "0.5"]
    P.main(argv)
    samples, rejects = strict_jsonl(out / "samples.jsonl"), strict_jsonl(out / "rejects.jsonl")
    strict_loads(open(out / "stats.json").read())
    got = {}
    for kind, paths in files.items():
        places = [places_of(p, samples, rejects) for p in paths]
        outcomes = {o for pl in places for o, _ in pl}
        assert len(outcomes) == 1, (kind, places)  # every file of the kind ends in one place
        got[kind] = outcomes.pop()
        for p, pl in zip(paths, places):  # a file named in a reject is named in exactly one
            assert pl and (pl[0][0] == "accepted" or len(pl) == 1), (p, pl)
    assert got == expect
    # every reject names its file and says what is wrong; every record is one of the corpus' kinds
    assert all(r["reasons"][0].split(":")[0] in set(expect.values()) and root in r["reasons"][0] for r in rejects)
    assert len(rejects) == sum(v != "accepted" for v in expect.values())
    accepted = [k for k, v in expect.items() if v == "accepted"]
    assert len(samples) == 6 * len(accepted)
    for s in samples:
        check_facts_and_words(s)
    by_kind = {s["id"].split("-train-")[1].split("-ct-")[0]: s for s in samples if s["question_type"] == "location"}
    assert "upper right part of the image" in by_kind["border"]["answer"]
    mask = np.asarray(Image.open(out / by_kind["non-binary-mask"]["mask"])) > 0
    assert mask.sum() == 20 * 20 + 2 * 20  # binarised > 0: the halo is kept
    assert np.asarray(Image.open(out / by_kind["huge-non-square"]["image"])).shape == (150, 2400)
    # nothing else is lost: a rerun decides nothing new and leaves both files as they were
    before = [(out / n).read_bytes() for n in ("samples.jsonl", "rejects.jsonl")]
    stats = P.main(argv)
    assert stats["last_run"]["sample"] == stats["last_run"]["reject"] == 0
    assert [(out / n).read_bytes() for n in ("samples.jsonl", "rejects.jsonl")] == before
    tally("prepare_data.py --source biomedparse", got)


def test_degenerate_masks_never_reach_measure():
    """measure() itself refuses what the readers reject: no NaN can be computed."""
    img = np.full((64, 64), 90, np.uint8)
    one = np.pad(np.ones((1, 1), bool), ((5, 58), (5, 58)))
    for mask, why in ((np.zeros((64, 64), bool), "empty_mask"), (one, "too_small"),
                      (np.ones((64, 64), bool), "too_large")):
        with pytest.raises(ValueError, match=why):
            F.measure(img, mask)
    assert F.share_words(0.00002) == "less than 1%" and F.share_words(0.0049) == "less than 1%"
    assert F.share_words(0.006) == "about 1%" and F.share_words(0.034) == "about 3%"
    with pytest.raises(ValueError, match="not JSON compliant"):
        P.strict_json({"elongation": float("nan")})


# ----------------------------------------------------------------------------------------------------
# Stage 1, MSD reader
# ----------------------------------------------------------------------------------------------------
def nifti(path, array):
    import nibabel as nib
    os.makedirs(os.path.dirname(path), exist_ok=True)
    nib.save(nib.Nifti1Image(array, np.eye(4)), path)


def msd_corpus(root):
    """A task folder whose dataset.json lists one volume per kind. -> {kind: expected}."""
    vol = np.full((40, 40, 3), -100, np.float32)
    lab = np.zeros((40, 40, 3), np.uint8)
    vol[10:22, 10:22], lab[10:22, 10:22] = 80, 1  # 144 px on every slice
    expect, entries = {}, []

    def case(kind, expected, v=vol, l=lab):
        ip, lp = os.path.join(root, "imagesTr", f"{kind}.nii.gz"), os.path.join(root, "labelsTr", f"{kind}.nii.gz")
        if v is not None:
            nifti(ip, v) if isinstance(v, np.ndarray) else open(ip, "wb").write(v)
        if l is not None:
            nifti(lp, l) if isinstance(l, np.ndarray) else open(lp, "wb").write(l)
        entries.append({"image": f"./imagesTr/{kind}.nii.gz", "label": f"./labelsTr/{kind}.nii.gz"})
        expect[kind] = expected

    case("good", "accepted")
    case("missing-files", "missing_file", v=None, l=None)  # dataset.json points at files that are not there
    case("missing-label", "missing_file", l=None)
    case("broken-nifti", "unreadable_volume", v=b"\x1f\x8b not really gzip")
    case("size-mismatch", "size_mismatch", l=np.zeros((40, 41, 3), np.uint8))
    small = np.zeros((40, 40, 3), np.uint8)
    small[5:10, 5:10] = 1  # 25 px per slice: under the 100-pixel rule of §A.1 everywhere
    case("no-target", "no_target", l=small)
    full = np.zeros((40, 40, 3), np.uint8)
    full[:, :, 1] = 1  # the label fills a whole slice
    case("full-slice", "too_large", l=full)
    nan = vol.copy()
    nan[0, 0, 0] = np.nan
    case("nan-voxels", "non_finite", v=nan)
    case("two-d", "bad_shape", v=vol[:, :, 0], l=lab[:, :, 0])
    entries.append({"image": "./imagesTr/._good.nii.gz", "label": "./labelsTr/._good.nii.gz"})  # AppleDouble: skipped
    json.dump({"name": "Corpus", "modality": {"0": "CT"}, "labels": {"0": "background", "1": "spleen"},
               "training": entries}, open(os.path.join(root, "dataset.json"), "w"))
    return expect


def test_msd_corpus(tmp_path):
    root = str(tmp_path / "Task09_Corpus")
    expect = msd_corpus(root)
    out = tmp_path / "out"
    P.main(["--source", "msd", "--msd-root", root, "--out", str(out), "--workers", "1", "--msd-stride", "1"])
    samples, rejects = strict_jsonl(out / "samples.jsonl"), strict_jsonl(out / "rejects.jsonl")
    got = {}
    for kind in expect:
        places = {"accepted" for s in samples if s["meta"]["volume"] == f"imagesTr/{kind}.nii.gz"}
        places |= {r["reasons"][0].split(":")[0] for r in rejects if f"/{kind}.nii.gz" in r["reasons"][0]}
        assert len(places) == 1, (kind, places)
        got[kind] = places.pop()
    assert got == expect
    assert len(rejects) == len(expect) - 1 and len(samples) == 3  # the good volume's three slices
    assert not any("._good" in json.dumps(r) for r in rejects)
    for s in samples:
        check_facts_and_words(s)
    # run-level mistakes: one line, non-zero exit, before any work
    run = lambda *a: P.main(["--out", str(tmp_path / "o2"), "--workers", "1", *a])  # noqa: E731
    levels = {}
    os.makedirs(tmp_path / "Task01_Bad")
    open(tmp_path / "Task01_Bad" / "dataset.json", "w").write('{"training": [')
    levels["dataset.json not JSON"] = one_line_error(lambda: run("--source", "msd", "--msd-root",
                                                                 str(tmp_path / "Task01_Bad")))
    json.dump({"labels": ["background", "spleen"], "modality": {"0": "CT"}, "training": []},
              open(tmp_path / "Task01_Bad" / "dataset.json", "w"))
    levels["dataset.json labels a list"] = one_line_error(lambda: run("--source", "msd", "--msd-root",
                                                                      str(tmp_path / "Task01_Bad")))
    json.dump({"labels": {"0": "bg"}, "modality": {"0": "CT"}, "training": [{"image": 3, "label": None}]},
              open(tmp_path / "Task01_Bad" / "dataset.json", "w"))
    levels["dataset.json entry not a path"] = one_line_error(lambda: run("--source", "msd", "--msd-root",
                                                                         str(tmp_path / "Task01_Bad")))
    os.remove(tmp_path / "Task01_Bad" / "dataset.json")
    levels["no dataset.json"] = one_line_error(lambda: run("--source", "msd", "--msd-root",
                                                           str(tmp_path / "Task01_Bad")))
    for m in levels.values():
        assert m.startswith("prepare_data.py: error: ") and "Task01_Bad" in m
    got.update({k: "one-line error" for k in levels})
    tally("prepare_data.py --source msd", got)


def test_prepare_data_command_line_mistakes(tmp_path, capsys):
    """Arguments: argparse's usage line plus one error line, exit 2; a run with nothing usable: exit 1."""
    (tmp_path / "file").write_text("x")
    (tmp_path / "NoSplits").mkdir()
    cases = {"--out is a file": ["--out", str(tmp_path / "file")],
             "--val-frac nan": ["--val-frac", "nan"], "--test-frac 1.5": ["--test-frac", "1.5"],
             "--n 0": ["--n", "0"], "--image-size 4": ["--image-size", "4"],
             "--msd-channels a,b": ["--msd-channels", "a,b"],
             "--base-url without scheme": ["--base-url", "localhost:8000/v1"],
             "--msd-root missing": ["--source", "msd", "--msd-root", str(tmp_path / "nope")],
             "--bmp-root without splits": ["--source", "biomedparse", "--bmp-root", str(tmp_path / "NoSplits")]}
    got = {}
    for kind, argv in cases.items():
        argv = argv if "--out" in argv else ["--out", str(tmp_path / "o"), *argv]
        with pytest.raises(SystemExit) as e:
            P.main(argv + ["--workers", "1"])
        err = capsys.readouterr().err
        assert e.value.code != 0 and "Traceback" not in err
        got[kind] = "one-line error"
    # as typed: every input rejected -> exit 1, one line, and the rejects are written
    bad = tmp_path / "Allbad" / "train"
    bad.mkdir(parents=True)
    (bad / "a_CT_abdomen.png").write_text("not a png")
    p = subprocess.run([sys.executable, os.path.join(ROOT, "prepare_data.py"), "--source", "biomedparse",
                        "--bmp-root", str(tmp_path / "Allbad"), "--out", str(tmp_path / "o3"), "--workers", "1"],
                       capture_output=True, text=True, env=ENV, cwd=str(tmp_path))
    last = p.stderr.strip().splitlines()[-1]
    assert p.returncode == 1 and "Traceback" not in p.stderr
    assert last.startswith("prepare_data.py: error: no sample accepted, 1 rejected (first reason: no_mask: ")
    got["every input rejected"] = "one-line error"
    tally("prepare_data.py arguments", got)


# ----------------------------------------------------------------------------------------------------
# Stage 2, extract_roi.py
# ----------------------------------------------------------------------------------------------------
def test_extract_roi_corpus(tmp_path):
    from test_extract_roi import Stub  # an encoder with known features: no model needed
    d = str(tmp_path)
    img, sq = grey(100, 100, box=(30, 60, 30, 60))
    png(f"{d}/ok.png", img)
    png(f"{d}/ok_m.png", u8(sq))
    rows, expect = [], {}

    def row(kind, expected, image="ok.png", mask="ok_m.png", line=None):
        rows.append(line if line is not None else json.dumps(dict(id=kind, image=image, mask=mask, split="train")))
        expect[kind] = expected

    row("good", "row")
    row("missing-image", "failed", image="nope.png")
    open(f"{d}/text.png", "w").write("not an image")
    row("not-an-image", "failed", image="text.png")
    png(f"{d}/trunc.png", img)
    truncate(f"{d}/trunc.png")
    row("truncated-image", "failed", image="trunc.png")
    open(f"{d}/zero.png", "w").close()
    row("zero-bytes", "failed", image="zero.png")
    bomb_png(f"{d}/bomb.png")
    row("bomb", "failed", image="bomb.png")
    row("missing-mask", "failed", mask="gone_m.png")
    png(f"{d}/empty_m.png", np.zeros((100, 100), np.uint8))
    row("empty-mask", "failed", mask="empty_m.png")
    png(f"{d}/half_m.png", np.zeros((50, 100), np.uint8) + 255)
    row("size-mismatch", "failed", mask="half_m.png")
    one = np.zeros((100, 100), np.uint8)
    one[0, 99] = 255
    png(f"{d}/one_m.png", one)
    row("one-pixel-mask", "row", mask="one_m.png")  # a minimum crop around it, not a flat colour
    png(f"{d}/full_m.png", np.full((100, 100), 255, np.uint8))
    row("full-mask", "row", mask="full_m.png")
    png(f"{d}/rgba_m.png", np.dstack([u8(sq)] * 3 + [np.full((100, 100), 255, np.uint8)]))
    row("rgba-mask", "row", mask="rgba_m.png")
    png(f"{d}/deep.png", img.astype(np.uint16) * 250)
    row("16-bit-image", "row", image="deep.png")
    wide, wm = grey(120, 3000, box=(30, 90, 2500, 2700))
    png(f"{d}/wide.png", wide)
    png(f"{d}/wide_m.png", u8(wm))
    row("huge-non-square", "row", image="wide.png", mask="wide_m.png")
    row("invalid-json", "failed", line="{not json")
    row("not-an-object", "failed", line="[1, 2, 3]")
    row("missing-field", "failed", line=json.dumps({"id": "missing-field", "image": "ok.png"}))
    row("non-text-field", "failed", line=json.dumps({"id": "non-text-field", "image": 5, "mask": "ok_m.png"}))
    row("duplicate-id", "failed", line=json.dumps(dict(id="good", image="ok.png", mask="ok_m.png")))
    with open(f"{d}/samples.jsonl", "w") as f:
        f.write("\n".join(rows[:3]) + "\n\n" + "\n".join(rows[3:]) + "\n")  # a blank line is no sample
    args = ER.get_args(["--samples", "x", "--encoder", "x", "--out", "x", "--quiet"])
    rep = ER.extract(f"{d}/samples.jsonl", f"{d}/roi.safetensors", Stub(), args)
    with open(f"{d}/roi_report.json") as f:
        report = strict_loads(f.read())
    assert report["n_samples"] == len(rows) == rep["n_rows"] + len(rep["failed"])  # every line accounted for
    failed_lines = {f["line"] for f in rep["failed"]}
    lines = [i + 1 + (i >= 3) for i in range(len(rows))]  # file line numbers (the blank line is line 4)
    got = {kind: "failed" if ln in failed_lines else "row" for kind, ln in zip(expect, lines)}
    assert got == expect
    assert all(f["reason"] for f in rep["failed"])
    # user mistakes: one line (ROIError), raised before any encoder is loaded
    stub_args = ["--encoder", d, "--out", f"{d}/r.safetensors"]
    errors = {"--samples missing": ["--samples", f"{d}/none.jsonl", *stub_args],
              "--samples binary": ["--samples", f"{d}/ok.png", *stub_args],
              "--encoder missing folder": ["--samples", f"{d}/samples.jsonl", "--encoder", f"{d}/nope", "--out", "r"],
              "--encoder without config.json": ["--samples", f"{d}/samples.jsonl", *stub_args],
              "--out is a folder": ["--samples", f"{d}/samples.jsonl", "--encoder", d, "--out", d],
              "--tau nan": ["--samples", f"{d}/samples.jsonl", *stub_args, "--tau", "nan"],
              "--delta -1": ["--samples", f"{d}/samples.jsonl", *stub_args, "--delta", "-1"]}
    for kind, argv in errors.items():
        if kind == "--samples binary":  # passes the file checks; the reader refuses it
            msg = one_line_error(lambda: ER.read_units(f"{d}/ok.png"), ER.ROIError)
        else:
            msg = one_line_error(lambda: ER.main(argv), ER.ROIError)
        got[kind] = "one-line error"
        assert msg
    with open(f"{d}/bad.jsonl", "w") as f:
        f.write("\n".join(rows[1:5]) + "\n")
    msg = one_line_error(lambda: ER.extract(f"{d}/bad.jsonl", f"{d}/bad.safetensors", Stub(), args), ER.ROIError)
    assert "no sample of" in msg and "4 failed" in msg and os.path.isfile(f"{d}/bad_report.json")
    got["every sample failing"] = "one-line error"
    tally("extract_roi.py", got)


# ----------------------------------------------------------------------------------------------------
# Stage 4, evaluate.py: every input is checked before the model is loaded
# ----------------------------------------------------------------------------------------------------
def fake_ckpt(d):
    """What check_inputs reads of a checkpoint (no weights: the model is never loaded here)."""
    os.makedirs(f"{d}/bb", exist_ok=True)
    open(f"{d}/bb/config.json", "w").write("{}")
    os.makedirs(f"{d}/ckpt", exist_ok=True)
    json.dump({"args": {"backbone": f"{d}/bb"}, "backbone_path": f"{d}/bb"}, open(f"{d}/ckpt/config.json", "w"))
    open(f"{d}/ckpt/adapter.safetensors", "wb").close()
    return f"{d}/ckpt"


def test_evaluate_input_checks(tmp_path):
    d = str(tmp_path)
    ckpt = fake_ckpt(d)
    png(f"{d}/a.png", grey()[0])
    open(f"{d}/text.png", "w").write("not an image")
    good = dict(image="a.png", question="Is there a lesion?", answer="yes", answer_type="closed")

    def bench(name, *items, raw=None):
        path = f"{d}/{name}.jsonl"
        with open(path, "wb" if isinstance(raw, bytes) else "w") as f:
            f.write(raw if raw is not None else "".join(json.dumps(i) + "\n" for i in items))
        return path

    def check(*argv, bench_path=None):
        argv = ["--ckpt", ckpt, "--out", f"{d}/o", *argv] + (["--bench", bench_path] if bench_path else [])
        return E.check_inputs(E.get_args(argv))

    items = check(bench_path=bench("good", good, dict(good, choices=["yes", "no"], answer_index=0)))
    assert len(items) == 2  # the control passes
    got = {"good benchmark": "checked"}
    open(f"{d}/afile", "w").close()
    cases = {
        "--ckpt missing": lambda: E.check_inputs(E.get_args(["--ckpt", f"{d}/none", "--out", "o", "--bench", "x"])),
        "--ckpt without adapter": lambda: (os.makedirs(f"{d}/half", exist_ok=True),
                                           open(f"{d}/half/config.json", "w").write("{}"),
                                           E.check_inputs(E.get_args(["--ckpt", f"{d}/half", "--out", "o",
                                                                      "--bench", "x"]))),
        "--backbone missing": lambda: check("--backbone", f"{d}/nobb", bench_path=bench("g2", good)),
        "--out is a file": lambda: E.check_inputs(E.get_args(["--ckpt", ckpt, "--out", f"{d}/afile", "--bench",
                                                              bench("g3", good)])),
        "--bench missing": lambda: check(bench_path=f"{d}/none.jsonl"),
        "--bench empty": lambda: check(bench_path=bench("empty", raw="\n\n")),
        "--bench binary": lambda: check(bench_path=bench("binary", raw=b"\x89PNG\r\n\x1a\n\xff\xfe\x00")),
        "invalid JSON line": lambda: check(bench_path=bench("broken", raw=json.dumps(good) + "\n{oops\n")),
        "not an object": lambda: check(bench_path=bench("list", raw="[1, 2]\n")),
        "missing field": lambda: check(bench_path=bench("nofield", {"image": "a.png", "question": "q?"})),
        "bad answer_type": lambda: check(bench_path=bench("atype", dict(good, answer_type="maybe"))),
        "answer_index out of range": lambda: check(bench_path=bench("idx", dict(good, choices=["a", "b"],
                                                                                answer_index=2))),
        "choices not strings": lambda: check(bench_path=bench("cstr", dict(good, choices=[1, 2], answer_index=0))),
        "empty question": lambda: check(bench_path=bench("q", dict(good, question="  "))),
        "answer not a string": lambda: check(bench_path=bench("ans", dict(good, answer=["yes"]))),
        "image missing": lambda: check(bench_path=bench("noimg", dict(good, image="gone.png"))),
        "image not an image": lambda: check(bench_path=bench("txtimg", dict(good, image="text.png"))),
        "--batch-size 0": lambda: check("--batch-size", "0", bench_path=bench("g4", good)),
        "--data without samples.jsonl": lambda: check("--data", f"{d}/bb"),
    }
    for kind, fn in cases.items():
        with pytest.raises((E.EvalError, IO.CheckpointError)) as e:
            fn()
        assert "\n" not in str(e.value) and str(e.value)
        got[kind] = "one-line error"
    # as typed: exit 1, one line on stderr, and no model was loaded (the fake checkpoint has no weights)
    p = subprocess.run([sys.executable, os.path.join(ROOT, "evaluate.py"), "--ckpt", ckpt, "--out", f"{d}/o",
                        "--bench", bench("noimg2", dict(good, image="gone.png"))], capture_output=True, text=True,
                       env=ENV)
    assert p.returncode == 1 and p.stderr.count("\n") == 1, p.stderr
    assert p.stderr.startswith("evaluate.py: error: noimg2 item 'noimg2-1': image") and "gone.png" in p.stderr
    tally("evaluate.py", got)


# ----------------------------------------------------------------------------------------------------
# Stage 5, explain.py: the mistakes found before the model is loaded
# ----------------------------------------------------------------------------------------------------
def test_explain_input_errors(tmp_path, capsys):
    d = str(tmp_path)
    ckpt = fake_ckpt(d)
    png(f"{d}/a.png", grey()[0])
    png(f"{d}/t.png", grey()[0])
    truncate(f"{d}/t.png")
    open(f"{d}/text.png", "w").write("not an image")
    os.makedirs(f"{d}/runs")
    cases = {"image missing": [f"{d}/none.png", "Where?", "--ckpt", ckpt],
             "image not an image": [f"{d}/text.png", "Where?", "--ckpt", ckpt],
             "image truncated": [f"{d}/t.png", "Where?", "--ckpt", ckpt],
             "--ckpt missing": [f"{d}/a.png", "Where?", "--ckpt", f"{d}/none"],
             "no checkpoint under --runs": [f"{d}/a.png", "Where?", "--runs", f"{d}/runs"],
             "empty question": [f"{d}/a.png", " ", "--ckpt", ckpt],
             "--tile 0": [f"{d}/a.png", "Where?", "--ckpt", ckpt, "--tile", "0"],
             "--k 0": [f"{d}/a.png", "Where?", "--ckpt", ckpt, "--k", "0"]}
    got = {}
    for kind, argv in cases.items():
        with pytest.raises((X.ExplainError, SystemExit)) as e:
            X.main(argv)
        err = capsys.readouterr().err
        msg = str(e.value) if isinstance(e.value, X.ExplainError) else err.strip().splitlines()[-1]
        assert msg and "\n" not in msg and "Traceback" not in err, (kind, msg)
        got[kind] = "one-line error"
    tally("explain.py", got)


# ----------------------------------------------------------------------------------------------------
# Strict JSON: every artifact of a phantom pipeline run
# ----------------------------------------------------------------------------------------------------
def test_every_artifact_of_a_pipeline_run_is_strict_json(tmp_path, capsys):
    import torch
    import train as T
    from embedded.tiny import make_tiny
    torch.set_num_threads(1)
    d = str(tmp_path)
    models = make_tiny(f"{d}/models")
    data = f"{d}/data"
    P.main(["--n", "12", "--questions-per-image", "2", "--out", data, "--workers", "1", "--test-frac", "0.3"])
    ER.main(["--samples", f"{data}/samples.jsonl", "--encoder", f"{models}/encoder", "--out",
             f"{data}/roi.safetensors", "--quiet"])
    ER.main(["--samples", f"{data}/samples.jsonl", "--encoder", f"{models}/encoder", "--out",
             f"{data}/roi.safetensors", "--quiet", "--grid-search", "--subset", "4", "--taus", "0.05", "0.5",
             "--deltas", "0"])
    T.main(["--data", data, "--backbone", f"{models}/backbone", "--decoder", f"{models}/decoder", "--lora-r", "4",
            "--lora-alpha", "8", "--out", f"{d}/runs/t", "--batch-size", "2", "--max-steps", "1"])
    ckpt = f"{d}/runs/t/phase1"
    E.main(["--ckpt", ckpt, "--data", data, "--out", f"{d}/eval", "--limit", "2", "--max-new-tokens", "2",
            "--collapse", "--collapse-k", "2"])
    X.main([os.path.join(data, strict_jsonl(f"{data}/samples.jsonl")[0]["image"]), "Where is it?", "--ckpt", ckpt,
            "--k", "2", "--max-new-tokens", "2", "--max-step-tokens", "3", "--tile", "48"])
    capsys.readouterr()
    found = []
    for folder, _, names in os.walk(d):
        for name in names:
            path = os.path.join(folder, name)
            if name.endswith(".jsonl"):
                strict_jsonl(path)
            elif name.endswith(".json") and "/models/" not in path:  # transformers' own config files aside
                strict_loads(open(path).read())
            else:
                continue
            found.append(os.path.relpath(path, d))
    for must in ("data/samples.jsonl", "data/stats.json", "data/roi_report.json", "data/roi_gridsearch.json",
                 "runs/t/phase1/config.json", "eval/predictions.jsonl", "eval/metrics.json",
                 "runs/t/phase1/explain/"):
        assert any(f.startswith(must) for f in found), (must, found)


def test_json_writers_refuse_nan(tmp_path):
    """The writers enforce what the artifact test above observes: a NaN or an Infinity raises at the writer
    (evaluate's metrics, the checkpoint config) instead of landing in a file that strict readers reject."""
    import evaluate as E
    import model as M
    from pipeline import io as IO
    import torch
    for bad in (float("nan"), float("inf")):
        with pytest.raises(ValueError):
            E.write_json({"closed_acc": bad}, str(tmp_path / "metrics.json"))
    weights = type("Trained", (), {"trainable_state_dict": lambda self: ({"lora.A": torch.zeros(2, 2)}, {})})()
    with pytest.raises(ValueError):
        IO.save_checkpoint(str(tmp_path / "ckpt"), weights, {"lr": float("nan")})
    assert not os.path.exists(tmp_path / "ckpt")  # nothing half-written took the checkpoint's place
