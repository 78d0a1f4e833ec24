"""evaluate.py: §B.4 metrics on hand-computed cases, the converters (tools/convert_benchmarks.py) on files in
the published formats, and an end-to-end run on a tiny checkpoint whose numbers are recomputed from its predictions file."""
import csv
import json
import math
import os
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import evaluate as E
import model as M
from pipeline import io as IO
from pipeline import roi_encoder as RE
from pipeline import vqa_metrics as VM
from embedded.tiny import make_tiny
from tools import convert_benchmarks as CB

R, ALPHA = 4, 8.0


# ----------------------------------------------------------------------------------------------------
# A tiny checkpoint in train.py's format (shared with test_explain.py) and a small data folder.
# ----------------------------------------------------------------------------------------------------
def write_image(path, w=64, h=48, seed=0):
    rng = np.random.default_rng(seed)
    a = (rng.random((h, w, 3)) * 255).astype(np.uint8)
    a[h // 4:h // 2, w // 2:3 * w // 4] = 250  # a bright "lesion"
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(a).save(path)
    return path


def write_data(folder, n_test=4):
    """samples.jsonl with one train and n_test test items (choices + answer_index), PNGs next to it."""
    rows = [dict(id="s-train", source="phantom", image="images/0.png", question="Is the liver visible?",
                 answer="Yes, the liver is visible.", reasoning_chain=["A bright region is seen."], latent_steps=1,
                 split="train")]
    for i in range(1, n_test + 1):
        write_image(os.path.join(folder, "images", f"{i}.png"), seed=i)
        rows.append(dict(id=f"s-test-{i}", source="msd" if i % 2 else "biomedparse", image=f"images/{i}.png",
                         question="Where is the lesion located?", answer="It is in the upper right part.",
                         reasoning_chain=["A bright region is seen."] * (1 + i % 3), latent_steps=1 + i % 3,
                         split="test", choices=["It is in the upper left part.", "It is in the upper right part."],
                         answer_index=1))
    write_image(os.path.join(folder, "images", "0.png"))
    with open(os.path.join(folder, "samples.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return folder


def make_ckpt(root, plant=None, projector="res_mlp_ln"):
    """make_tiny + LoRA + scaffolds with perturbed weights, saved by model.save_checkpoint with a config.json
    shaped like train.py's. plant(vital) may overwrite weights before saving."""
    models, data, ckpt = (os.path.join(root, x) for x in ("models", "data", "runs/tiny/phase1"))
    if not os.path.isdir(models):
        make_tiny(models)
    write_data(data)
    torch.manual_seed(0)
    backbone, _ = IO.load_backbone(os.path.join(models, "backbone"))
    M.add_lora(backbone, R, ALPHA, 0.05)
    decoder, _ = IO.load_decoder(os.path.join(models, "decoder"))
    vital = M.VITAL(backbone, decoder, 48, projector)  # d_v = tiny encoder width
    with torch.no_grad():
        for n, p in vital.named_parameters():
            if ".lora_B" in n or not n.startswith("backbone."):
                p.add_(0.05 * torch.randn_like(p))
    if plant:
        plant(vital)
    args = dict(data=data, preset="tiny", models=models, backbone=os.path.join(models, "backbone"),
                decoder=os.path.join(models, "decoder"), lora_r=R, lora_alpha=ALPHA, lora_dropout=0.05,
                projector=projector, vp_dropout=0.1, phase=1, lambda_sem=1.0, lambda_vis=0.1)
    config = dict(args=args, phase=1, arch=dict(backbone="x", decoder="y", lora=[R, ALPHA]), step=2,
                  backbone_path=os.path.abspath(args["backbone"]), decoder_path=os.path.abspath(args["decoder"]))
    IO.save_checkpoint(ckpt, vital, config)
    return ckpt, data, models


# ----------------------------------------------------------------------------------------------------
# Metrics
# ----------------------------------------------------------------------------------------------------
def test_normalize():
    assert VM.normalize("The TWO lesions.") == "2 lesions"
    assert VM.normalize("  X-ray, LEFT lung!") == "x ray left lung"
    assert VM.normalize("An oval mass of 2.5 cm") == "oval mass of 2.5 cm"
    assert VM.normalize("Yes.") == "yes"


def test_token_f1_by_hand():
    # pred [liver, is, large], gold [large, liver]: common 2, P = 2/3, R = 1, F1 = 0.8
    assert VM.token_f1("The liver is large.", "Large liver") == pytest.approx(0.8)
    assert VM.token_f1("two nodules", "2 nodules") == 1.0
    assert VM.token_f1("kidney", "liver") == 0.0
    assert VM.token_f1("", "") == 1.0 and VM.token_f1("liver", "") == 0.0
    # repeated tokens count once per occurrence: pred [a-less] [liver, liver], gold [liver] -> P 1/2, R 1
    assert VM.token_f1("liver liver", "liver") == pytest.approx(2 / 3)


def test_match_rules():
    ch = ["It is in the upper left part.", "It is in the upper right part.", "Computed tomography", "MRI"]
    assert VM.match_rule("B", ch) == (1, "letter")
    assert VM.match_rule("(c) something", ch) == (2, "letter")
    assert VM.match_rule("D: MRI", ch) == (3, "letter")
    assert VM.match_rule("mri", ch) == (3, "exact")                      # exact after normalisation
    assert VM.match_rule("upper right", ch) == (1, "f1")                 # unique best token-F1
    assert VM.match_rule("It is in the upper part", ch) == (None, "none")  # tie between choices 0 and 1: a miss
    assert VM.match_rule("kidney", ch) == (None, "none")                 # no overlap: a miss
    assert VM.match_rule("A structure in the upper left", ch) == (0, "f1")  # the article 'A' is not a letter


def test_score_item_closed_open():
    yn = dict(answer="yes", answer_type="closed")
    assert VM.score_item(yn, "Yes, it is visible.")["correct"] is True
    assert VM.score_item(yn, "No.")["correct"] is False
    miss = VM.score_item(yn, "maybe")
    assert miss["matched"] is None and miss["correct"] is False
    assert VM.score_item(dict(answer="CT", answer_type="closed"), "ct.")["correct"] is True
    assert VM.score_item(dict(answer="CT", answer_type="closed"), "a CT scan")["correct"] is False
    mc = dict(answer="MRI", answer_type="closed", choices=["CT", "MRI"], answer_index=1)
    assert VM.score_item(mc, "B")["correct"] is True and VM.score_item(mc, "A")["correct"] is False
    assert VM.score_item(dict(answer="left lung", answer_type="open"), "the left")["f1"] == pytest.approx(2 / 3)


def test_aggregate_by_hand():
    rows = [dict(benchmark="b", answer_type="closed", choices=["x", "y"], matched=0, matched_by="letter",
                 correct=True),
            dict(benchmark="b", answer_type="closed", choices=["x", "y"], matched=None, matched_by="none",
                 correct=False),
            dict(benchmark="b", answer_type="closed", choices=None, matched=None, matched_by="exact", correct=True),
            dict(benchmark="b", answer_type="open", f1=0.5), dict(benchmark="b", answer_type="open", f1=0.0)]
    m = VM.aggregate(rows)["b"]
    assert m["closed_acc"] == pytest.approx(200 / 3) and m["n_closed"] == 3 and m["unmatched"] == 1
    assert m["mc_acc"] == 50.0 and m["n_mc"] == 2
    assert m["open_f1"] == 25.0 and m["n_open"] == 2
    assert m["fallback_share"] == 50.0  # of the 2 items with choices: 1 matched nothing


def test_matched_by_and_fallback_share_on_planted_predictions():
    """One prediction per rule on an item with four options (gold B): the letter, B's exact text, a token-F1
    pick, nothing; then a yes/no item without choices (not in the share). Fallback = (f1 + none) / 4 = 50%."""
    item = dict(answer="It is in the upper right part.", answer_type="closed", answer_index=1,
                choices=["It is in the upper left part.", "It is in the upper right part.", "Computed tomography",
                         "MRI"])
    planted = {"(B)": ("letter", 1, True), "it is in upper right part": ("exact", 1, True),
               "upper right": ("f1", 1, True), "kidney": ("none", None, False)}
    rows = []
    for pred, (by, idx, ok) in planted.items():
        sc = VM.score_item(item, pred)
        assert (sc["matched_by"], sc["matched"], sc["correct"]) == (by, idx, ok), pred
        rows.append(dict(item, benchmark="b", prediction=pred, **sc))
    yn = dict(answer="yes", answer_type="closed")
    rows.append(dict(yn, benchmark="b", **VM.score_item(yn, "Yes, it is.")))  # f1 on ["yes", "no"], no options
    m = VM.aggregate(rows)["b"]
    assert m["matched_by"] == dict(letter=1, exact=1, f1=1, none=1) and m["n_mc"] == 4
    assert m["fallback_share"] == 50.0 and m["closed_acc"] == 80.0
    assert "| Acc | 80.00 | 5 | 50.0% (1 / 1 of 4) |" in VM.table_md({"b": m}, "VITAL")


def test_one_prompt_for_train_and_evaluate(tmp_path):
    """An item with choices is asked with every option and its letter; train.py's loader (options shown) and
    evaluate.py (--protocol options) build the identical prompt; --protocol free asks the bare question."""
    import train
    data = write_data(str(tmp_path / "d"))
    prompt = IO.ask("Where?", ["left", "right", "both"])
    assert prompt == "Where?\n(A) left\n(B) right\n(C) both\nAnswer with one of the options."
    assert IO.ask("Where?") == IO.ask("Where?", []) == "Where?"
    items = E.read_test_split(data)
    records = {r["id"]: r for r in train.read_samples(os.path.join(data, "samples.jsonl"))}
    for it in items:
        assert it["prompt"].startswith(it["question"] + "\n")
        for letter, c in zip("AB", it["choices"]):
            assert f"({letter}) {c}\n" in it["prompt"]
        assert train.asked(records[it["id"]], True) == (it["prompt"], it["choices"][it["answer_index"]])
    assert [it["prompt"] for it in E.read_test_split(data, "free")] == [it["question"] for it in items]
    bench = tmp_path / "b.jsonl"
    bench.write_text(json.dumps(dict(image="x.png", question="Modality?", answer="MRI", answer_type="closed",
                                     choices=["CT", "MRI"], answer_index=1)) + "\n")
    assert E.read_benchmark(str(bench))[0]["prompt"] == IO.ask("Modality?", ["CT", "MRI"])
    assert E.read_benchmark(str(bench), "free")[0]["prompt"] == "Modality?"


# ----------------------------------------------------------------------------------------------------
# Converters on small files in the published formats
# ----------------------------------------------------------------------------------------------------
def convert(tmp_path, fmt, src, *extra):
    out = str(tmp_path / "bench" / f"{fmt}.jsonl")
    CB.main(["--format", fmt, "--src", str(src), "--out", out, *extra])
    return [json.loads(l) for l in open(out)]


def test_convert_vqa_rad(tmp_path):
    src = tmp_path / "VQA_RAD Dataset Public.json"
    src.write_text(json.dumps([
        dict(qid=1, image_name="synpic1.jpg", question="Is there a fracture?", answer="No", answer_type="CLOSED"),
        dict(qid=2, image_name="synpic1.jpg", question="Which organ?", answer="Liver", answer_type="OPEN"),
        dict(qid=3, image_name="synpic2.jpg", question="CT or MRI?", answer="CT", answer_type="CLOSED")]))
    items = convert(tmp_path, "vqa-rad", src, "--images", str(tmp_path / "imgs"))
    assert [i["answer_type"] for i in items] == ["closed", "open", "closed"]
    assert items[0]["image"] == str(tmp_path / "imgs" / "synpic1.jpg") and items[1]["answer"] == "Liver"
    assert items[0]["id"] == "vqa-rad-1"


def test_convert_pathvqa_yes_no_rule(tmp_path):
    src = tmp_path / "test.json"
    src.write_text(json.dumps([dict(image="test_0001", question="Is this benign?", answer="yes"),
                               dict(image="test_0002", question="What is shown?", answer="lymphocytes")]))
    items = convert(tmp_path, "pathvqa", src)
    assert [i["answer_type"] for i in items] == ["closed", "open"]


def test_convert_slake_english_only(tmp_path):
    (tmp_path / "imgs" / "xmlab1").mkdir(parents=True)
    src = tmp_path / "test.json"
    src.write_text(json.dumps([
        dict(qid=11, img_name="xmlab1/source.jpg", question="Is the lung healthy?", answer="No",
             answer_type="CLOSED", q_lang="en"),
        dict(qid=12, img_name="xmlab1/source.jpg", question="肺是否健康?", answer="否", answer_type="CLOSED", q_lang="zh"),
        dict(qid=13, img_name="xmlab1/source.jpg", question="Where is the liver?", answer="Left", answer_type="OPEN",
             q_lang="en")]))
    items = convert(tmp_path, "slake", src)
    assert [i["id"] for i in items] == ["slake-11", "slake-13"]
    assert items[0]["image"] == str(tmp_path / "imgs" / "xmlab1" / "source.jpg")  # imgs/ found by default
    assert [i["answer_type"] for i in items] == ["closed", "open"]


def test_convert_pmc_vqa_both_spellings(tmp_path):
    src = tmp_path / "test_clean.csv"
    with open(src, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["Figure_path", "Question", "Anwser", "Choice A", "Choice B", "Choice C", "Choice D"])
        w.writerow(["PMC1.jpg", "What modality?", "B:MRI", "A:CT", "B:MRI", "C:X-ray", "D:Ultrasound"])
        w.writerow(["PMC2.jpg", "Which side?", "C", " A: left", " B: right", " C: both", " D: none"])
    items = convert(tmp_path, "pmc-vqa", src)
    assert items[0]["choices"] == ["CT", "MRI", "X-ray", "Ultrasound"] and items[0]["answer_index"] == 1
    assert items[0]["answer"] == "MRI" and items[0]["answer_type"] == "closed"
    assert items[1]["choices"][2] == "both" and items[1]["answer_index"] == 2
    src2 = tmp_path / "test2.csv"
    with open(src2, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["Figure_path", "Question", "Answer", "Answer_label", "Choice A", "Choice B", "Choice C", "Choice D"])
        w.writerow(["PMC3.jpg", "Organ?", "Liver", "D", "A:Lung", "B:Heart", "C:Brain", "D:Liver"])
    assert convert(tmp_path, "pmc-vqa", src2)[0]["answer_index"] == 3


def test_convert_gemex_string_and_list(tmp_path):
    src = tmp_path / "single_choice_question.jsonl"
    src.write_text("\n".join(json.dumps(r) for r in [
        dict(image_path="p10/s1.jpg", question="Where is the opacity?", options=["A. left", "B. right"], answer="B",
             question_type="single-choice"),
        dict(image_path="p10/s2.jpg", question="Findings?", answer=["effusion", "atelectasis"], question_type="open"),
        dict(image_path="p10/s3.jpg", question="Is there edema?", answer="yes", question_type="closed")]) + "\n")
    items = convert(tmp_path, "gemex", src)
    assert items[0]["choices"] == ["left", "right"] and items[0]["answer_index"] == 1 and items[0]["answer"] == "right"
    assert items[1]["answer"] == "effusion, atelectasis" and items[1]["answer_type"] == "open"
    assert items[2]["answer_type"] == "closed"


def test_convert_parquet_without_pyarrow_says_so(tmp_path, monkeypatch):
    src = tmp_path / "test-00000-of-00001.parquet"
    src.write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # makes `import pyarrow.parquet` fail
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(E.EvalError, match="pyarrow"):
        convert(tmp_path, "vqa-rad", src)


def test_convert_missing_field_names_record(tmp_path):
    src = tmp_path / "bad.json"
    src.write_text(json.dumps([dict(image="a.jpg", question="q?", answer="yes"), dict(image="b.jpg", answer="no")]))
    with pytest.raises(E.EvalError, match=r"bad.json record 2: none of the fields \['question'"):
        convert(tmp_path, "pathvqa", src)


# ----------------------------------------------------------------------------------------------------
# End to end on a tiny checkpoint
# ----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("ev"))
    ckpt, data, models = make_ckpt(root)
    bench = os.path.join(root, "bench", "vqa-rad.jsonl")
    os.makedirs(os.path.dirname(bench))
    img = write_image(os.path.join(root, "bench", "img.png"), 40, 56, seed=9)
    items = [dict(id="b1", image="img.png", question="Is there a mass?", answer="yes", answer_type="closed"),
             dict(id="b2", image=img, question="Which organ?", answer="left lung", answer_type="open"),
             dict(id="b3", image="img.png", question="Modality?", answer="MRI", answer_type="closed",
                  choices=["CT", "MRI"], answer_index=1)]
    with open(bench, "w") as f:
        f.writelines(json.dumps(i) + "\n" for i in items)
    out = os.path.join(root, "eval")
    res = E.main(["--ckpt", ckpt, "--data", data, "--bench", bench, "--out", out, "--max-new-tokens", "6",
                  "--batch-size", "3", "--latency", "--latency-n", "1", "--repeats", "1", "--warmup", "1",
                  "--collapse", "--collapse-k", "3"])
    return dict(root=root, ckpt=ckpt, data=data, models=models, bench=bench, out=out, res=res)


def test_evaluate_writes_outputs_that_agree_with_predictions(tiny):
    out = tiny["out"]
    for name in ("predictions.jsonl", "metrics.json", "table.md", "latency.json", "collapse.json", "collapse.png"):
        assert os.path.isfile(os.path.join(out, name)), name
    rows = [json.loads(l) for l in open(os.path.join(out, "predictions.jsonl"))]
    assert len(rows) == 4 + 3 and all(r["K"] == 4 for r in rows)
    metrics = json.load(open(os.path.join(out, "metrics.json")))["benchmarks"]
    assert set(metrics) == {"in-domain/msd", "in-domain/biomedparse", "vqa-rad"}
    for r in rows:  # every stored score is what the scoring rule gives for the stored prediction
        assert {k: r[k] for k in VM.score_item(r, r["prediction"])} == VM.score_item(r, r["prediction"])
    for name, m in metrics.items():  # and the metrics are plain means over those rows
        rs = [r for r in rows if r["benchmark"] == name]
        closed = [r for r in rs if r["answer_type"] == "closed"]
        assert m["closed_acc"] == pytest.approx(100 * np.mean([r["correct"] for r in closed]))
        if name == "vqa-rad":
            assert m["open_f1"] == pytest.approx(100 * [r for r in rs if r["id"] == "b2"][0]["f1"])
            assert m["n_mc"] == 1
    table = open(os.path.join(out, "table.md")).read()
    assert "| In-Domain Testsets | MSD | Acc |" in table and "| Medical VQA | VQA-RAD | Token-F1 |" in table
    # the protocol, and how each prediction was mapped: the fallback share recomputed from the rows
    assert json.load(open(os.path.join(out, "metrics.json")))["protocol"] == "options" and "fallback" in table
    for name, m in metrics.items():
        mc = [r for r in rows if r["benchmark"] == name and r.get("choices")]
        assert m["matched_by"] == {by: sum(r["matched_by"] == by for r in mc) for by in VM.MATCHED_BY}
        assert m["fallback_share"] == pytest.approx(100 * np.mean([r["matched_by"] in ("f1", "none") for r in mc]))


def test_protocol_free_asks_the_bare_question(tiny):
    """--protocol free is the evaluation before the options were shown: the bare question goes in."""
    out = os.path.join(tiny["root"], "ev_free")
    res = E.main(["--ckpt", tiny["ckpt"], "--data", tiny["data"], "--out", out, "--max-new-tokens", "3",
                  "--protocol", "free"])
    assert res["protocol"] == "free"
    bb, proc, _, _ = E.load_inference_model(tiny["ckpt"])
    eos, items = proc.tokenizer.convert_tokens_to_ids("<|im_end|>"), E.read_test_split(tiny["data"])
    prefix = IO.build_prefix(proc, [E.open_image(it["image_path"]) for it in items], [it["question"] for it in items])
    ids, _ = M.generate(bb, prefix, 4, eos, 3)
    want = [t.strip() for t in proc.tokenizer.batch_decode(ids, skip_special_tokens=True)]
    assert [json.loads(l)["prediction"] for l in open(os.path.join(out, "predictions.jsonl"))] == want


def test_deployed_model_has_zero_overhead(tiny):
    ov = tiny["res"]["overhead"]
    plain, _ = IO.load_backbone(os.path.join(tiny["models"], "backbone"))
    assert ov["extra_params"] == 0 and ov["extra_bytes"] == 0
    assert ov["deployed"]["params"] == IO.count_params(plain)
    assert ov["scaffold_bytes_left_on_disk"] > 0


def test_folded_model_answers_like_the_unmerged_lora(tiny):
    """The merged+unwrapped inference model must give the tokens of the trained (unmerged) LoRA model:
    this fails if the adapter were not loaded or were folded wrongly."""
    backbone, processor = IO.load_backbone(os.path.join(tiny["models"], "backbone"))
    M.add_lora(backbone, R, ALPHA, 0.0)
    IO.load_checkpoint(tiny["ckpt"], M.VITAL(backbone), scaffolds=False)
    backbone.eval()
    items, run = E.read_test_split(tiny["data"]), SimpleNamespace(batch_size=8, max_new_tokens=6)
    preds = E.predict(backbone, processor, items, 4, run, torch.device("cpu"))
    rows = [json.loads(l) for l in open(os.path.join(tiny["out"], "predictions.jsonl"))][:len(items)]
    assert preds == [r["prediction"] for r in rows]
    plain, _ = IO.load_backbone(os.path.join(tiny["models"], "backbone"))
    assert E.predict(plain, processor, items, 4, run, torch.device("cpu")) != preds  # the LoRA matters


def test_latency_and_collapse_numbers(tiny):
    lat = json.load(open(os.path.join(tiny["out"], "latency.json")))
    assert sorted(lat["per_K"]) == ["0", "1", "2", "3", "4"]
    assert lat["per_K"]["0"]["ratio_to_K0"] == 1.0
    for v in lat["per_K"].values():
        assert v["ms_per_sample"] > 0 and 1 <= v["answer_tokens"] <= 6
        assert v["answer_ms"] == pytest.approx(v["ms_per_sample"] - v["loop_ms"])
    col = json.load(open(os.path.join(tiny["out"], "collapse.json")))
    S = np.array(col["matrix"])
    # §C.6 on the in-domain test split only: the 4 test items of samples.jsonl, not the 3 vqa-rad items
    assert S.shape == (3, 3) and col["n_samples"] == 4 and col["item_ids"] == [f"s-test-{i}" for i in range(1, 5)]
    assert col["benchmarks"] == ["in-domain/biomedparse", "in-domain/msd"]
    assert np.allclose(np.diag(S), 1.0, atol=1e-6) and np.allclose(S, S.T, atol=1e-9)
    assert col["adjacent"] == pytest.approx([S[0, 1], S[1, 2]])
    assert Image.open(os.path.join(tiny["out"], "collapse.png")).size == (50 + 3 * 80 + 10, 40 + 3 * 80 + 10)


def test_collapse_ignores_benchmark_files(tiny):
    """Adding external benchmark items changes nothing (§C.6 is the in-domain test set); with none: an error."""
    backbone, processor = IO.load_backbone(os.path.join(tiny["models"], "backbone"))
    ours, bench = E.read_test_split(tiny["data"]), E.read_benchmark(tiny["bench"])
    cpu = torch.device("cpu")
    assert E.collapse_matrix(backbone, processor, bench + ours, 2, 3, cpu) == \
        E.collapse_matrix(backbone, processor, ours, 2, 3, cpu)
    with pytest.raises(E.EvalError, match="in-domain test set"):
        E.collapse_matrix(backbone, processor, bench, 2, 3, cpu)
    with pytest.raises(E.EvalError, match="in-domain test set"):  # before any model is loaded
        E.main(["--ckpt", tiny["ckpt"], "--bench", tiny["bench"], "--out", os.path.join(tiny["root"], "ev4"),
                "--collapse"])


def test_k_sample_groups_by_latent_steps(tiny):
    res = E.main(["--ckpt", tiny["ckpt"], "--data", tiny["data"], "--out", os.path.join(tiny["root"], "ev2"),
                  "--k", "sample", "--max-new-tokens", "2"])
    rows = [json.loads(l) for l in open(os.path.join(tiny["root"], "ev2", "predictions.jsonl"))]
    want = {r["id"]: r["latent_steps"] for r in E.read_test_split(tiny["data"])}
    assert {r["id"]: r["K"] for r in rows} == want and len(set(want.values())) > 1
    assert res["K"] == "sample"
    with pytest.raises(E.EvalError, match="latent_steps"):
        E.main(["--ckpt", tiny["ckpt"], "--bench", tiny["bench"], "--out", os.path.join(tiny["root"], "ev3"),
                "--k", "sample"])


def test_input_errors(tiny, tmp_path):
    with pytest.raises(IO.CheckpointError, match="missing config.json"):
        E.main(["--ckpt", str(tmp_path), "--data", tiny["data"], "--out", str(tmp_path / "o")])
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(dict(image="a.png", question="q", answer="a", answer_type="closed")) + "\n"
                   + json.dumps(dict(image="a.png", question="q", answer="a", answer_type="maybe")) + "\n")
    with pytest.raises(E.EvalError, match=r"bad.jsonl line 2: field 'answer_type'"):
        E.read_benchmark(str(bad))
    with pytest.raises(E.EvalError, match="no item with split 'test'"):
        (tmp_path / "d").mkdir()
        (tmp_path / "d" / "samples.jsonl").write_text("")
        E.read_test_split(str(tmp_path / "d"))


def test_test_split_captions_are_open_and_other_items_need_choices(tmp_path):
    """prepare_data.py --captions gives captions no choices: in the test split they are scored open-ended
    (token-F1); any other item without choices is still refused, naming the line."""
    d = tmp_path / "d"
    d.mkdir()
    base = dict(split="test", image="a.png", answer="A round lesion.", latent_steps=1, source="phantom")
    rows = [dict(base, id="c", question="Describe the image.", question_type="caption"),
            dict(base, id="q", question="Shape?", question_type="describe", choices=["round", "oval"],
                 answer_index=0)]
    (d / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    items = {it["id"]: it for it in E.read_test_split(str(d))}
    assert items["c"]["answer_type"] == "open" and items["c"]["prompt"] == "Describe the image."
    assert items["q"]["answer_type"] == "closed" and "(A) round" in items["q"]["prompt"]
    del rows[1]["choices"]
    (d / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(E.EvalError, match=r"samples.jsonl line 2: missing field 'choices'"):
        E.read_test_split(str(d))


# ----------------------------------------------------------------------------------------------------
# Probes (--probe): the loop's one intervention point (model.latent_loop's feed) and evaluate.py's probes
# ----------------------------------------------------------------------------------------------------
def _probe_prefix(tiny, same):
    """A batch of two: the same test item twice, or a test item and the bench image (another size, another
    question: a genuinely left-padded batch). -> (deployed backbone, prefix)."""
    bb, proc, _, _ = E.load_inference_model(tiny["ckpt"])
    it = E.read_test_split(tiny["data"])[0]
    other = (it["image_path"], it["question"]) if same else \
        (os.path.join(tiny["root"], "bench", "img.png"), "Which organ is enlarged here?")
    images = [E.open_image(it["image_path"]), E.open_image(other[0])]
    return bb, IO.build_prefix(proc, images, [it["question"], other[1]])


def _explicit_loop(bb, prefix, inputs):
    """The loop written out: step k is fed inputs(k, st) through _text_step, nothing else."""
    st = M.prefix_forward(bb, prefix)
    for k in range(1, len(inputs) + 1):
        st.h.append(M._text_step(bb, inputs[k - 1](st), st))
    return st


@torch.no_grad()
def test_feed_none_is_the_loop_unchanged(tiny):
    bb, prefix = _probe_prefix(tiny, same=False)
    assert (prefix["attention_mask"] == 0).any()  # left-padded
    st = M.latent_loop(bb, prefix, 3)
    explicit = _explicit_loop(bb, prefix, [lambda s: s.h[-1]] * 3)   # h_k = LM(h_{k-1}), eq. 1
    fed = M.latent_loop(bb, prefix, 3, feed=lambda k, s: s.h[-1])
    assert len(st.h) == 4
    for a, b, c in zip(st.h, explicit.h, fed.h):
        assert torch.equal(a, b) and torch.equal(a, c)                # bit-identical, not just close


@torch.no_grad()
def test_zero_and_h0_probes_feed_what_they_say(tiny):
    bb, prefix = _probe_prefix(tiny, same=False)
    normal = M.latent_loop(bb, prefix, 2)
    feeds, calls = E.probe_feeds(normal), []

    def zero(k, st):
        calls.append((k, len(st.h)))  # step k sees h_0..h_{k-1}
        return feeds["zero"](k, st)

    z = M.latent_loop(bb, prefix, 2, feed=zero)
    assert calls == [(1, 1), (2, 2)]
    explicit = _explicit_loop(bb, prefix, [lambda s: torch.zeros_like(s.h[0])] * 2)
    assert torch.equal(z.h[1], explicit.h[1]) and torch.equal(z.h[2], explicit.h[2])
    assert (z.h[1] - normal.h[1]).abs().max() > 1e-4                 # a zero input is not h_0
    h0 = M.latent_loop(bb, prefix, 2, feed=feeds["h0"])
    explicit = _explicit_loop(bb, prefix, [lambda s: s.h[0]] * 2)
    assert torch.equal(h0.h[1], normal.h[1])                          # step 1 is fed h_0 either way
    assert torch.equal(h0.h[2], explicit.h[2]) and (h0.h[2] - normal.h[2]).abs().max() > 1e-4


@torch.no_grad()
def test_shuffled_feeds_the_other_items_chain(tiny):
    for same in (True, False):
        bb, prefix = _probe_prefix(tiny, same)
        normal = M.latent_loop(bb, prefix, 3)
        sh = M.latent_loop(bb, prefix, 3, feed=E.probe_feeds(normal)["shuffled"])
        explicit = _explicit_loop(bb, prefix, [lambda s, k=k: normal.h[k].flip(0) for k in range(3)])
        for a, b in zip(sh.h, explicit.h):
            assert torch.equal(a, b)                                 # B = 2: the roll swaps the two items
        diff = (torch.cat(sh.h, 1) - torch.cat(normal.h, 1)).abs().max()
        if same:   # identical items have interchangeable states: shuffling changes nothing
            assert diff <= 1e-6
        else:
            assert diff > 1e-4


def test_probe_batches_and_mcnemar():
    assert [len(c) for c in E.probe_batches(list(range(5)), 2)] == [2, 3]   # no batch of one
    assert [len(c) for c in E.probe_batches(list(range(6)), 4)] == [4, 2]
    assert VM.mcnemar_p(0, 0) == 1.0 and VM.mcnemar_p(3, 3) == 1.0
    assert VM.mcnemar_p(0, 5) == pytest.approx(2 / 32) and VM.mcnemar_p(1, 5) == pytest.approx(2 * 7 / 64)


def test_probe_writes_every_probe_and_k_in_strict_json(tiny, capsys):
    out = os.path.join(tiny["root"], "ev_probe")
    E.main(["--ckpt", tiny["ckpt"], "--data", tiny["data"], "--out", out, "--max-new-tokens", "6",
            "--batch-size", "2", "--probe"])                            # 4 items: two batches of 2

    def no_nan(name):
        raise ValueError(f"non-strict JSON constant {name}")

    res = json.loads(open(os.path.join(out, "probes.json")).read(), parse_constant=no_nan)
    assert set(res["probes"]) == {"normal", "zero", "h0", "shuffled"} and res["K"] == 4
    assert sorted(res["k_sweep"]) == ["0", "1", "2", "3", "4"]
    assert res["k_sweep"]["4"] == res["probes"]["normal"]
    assert res["n"] == 4 and res["chance"] == 50.0
    rows = [json.loads(l) for l in open(os.path.join(out, "probe_predictions.jsonl"))]
    items = {it["id"]: it for it in E.read_test_split(tiny["data"])}
    for r in list(res["probes"].values()) + list(res["k_sweep"].values()):
        assert r["n"] == 4 and all(math.isfinite(r[k]) for k in ("accuracy", "change_vs_normal", "p_mcnemar"))
    for name, r in list(res["probes"].items()) + [("normal", r) for r in res["k_sweep"].values()]:
        key = f"{name} K={r['K']}"
        ok = [VM.score_item(items[row["id"]], row["predictions"][key])["correct"] for row in rows]
        assert r["accuracy"] == pytest.approx(100 * np.mean(ok))      # recomputed from the stored answers
    main = {r["id"]: r["prediction"] for r in map(json.loads, open(os.path.join(out, "predictions.jsonl")))}
    # normal = the evaluation, item by item, in every batch (a sweep that appended K's answers a second time once
    # shifted every later batch's rows onto earlier items: the demo's probe table read normal at 17.5% for 57.4%)
    assert len(rows) == 4 and all(row["predictions"]["normal K=4"] == main[row["id"]] for row in rows)
    table = capsys.readouterr().out
    assert "| shuffled | 4 |" in table and "| normal | 0 |" in table and "| chance" in table
    with pytest.raises(E.EvalError, match=">= 2 in-domain"):  # one item has no partner to swap with
        args = E.get_args(["--ckpt", "x", "--data", "d", "--out", "o", "--probe"])
        E.run_probes(None, None, list(items.values())[:1], args, torch.device("cpu"))
    with pytest.raises(SystemExit):
        E.get_args(["--ckpt", "x", "--out", "o", "--bench", "b.jsonl", "--probe"])   # no in-domain split


def test_probe_at_each_items_own_k(tiny, capsys):
    """--k sample --probe: every item runs its own latent_steps, shuffled pairs items of the same K, and
    'normal' is the evaluation's own answer; a K with one item (no partner) is refused."""
    data = write_data(os.path.join(tiny["root"], "data6"), n_test=6)     # latent_steps 2, 3, 1, 2, 3, 1
    out = os.path.join(tiny["root"], "ev_probe_sample")
    E.main(["--ckpt", tiny["ckpt"], "--data", data, "--out", out, "--max-new-tokens", "6", "--batch-size", "3",
            "--k", "sample", "--probe"])
    res = json.load(open(os.path.join(out, "probes.json")))
    assert res["K"] == "sample" and set(res["probes"]) == {"normal", "zero", "h0", "shuffled"}
    assert list(res["k_sweep"]) == ["0"] and res["n"] == 6
    main = {r["id"]: r for r in map(json.loads, open(os.path.join(out, "predictions.jsonl")))}
    assert sorted(r["K"] for r in main.values()) == [1, 1, 2, 2, 3, 3]
    rows = [json.loads(l) for l in open(os.path.join(out, "probe_predictions.jsonl"))]
    assert all(row["predictions"]["normal K=sample"] == main[row["id"]]["prediction"] for row in rows)
    assert res["probes"]["normal"]["accuracy"] == pytest.approx(100 * np.mean([r["correct"] for r in main.values()]))
    assert "| shuffled | sample |" in capsys.readouterr().out
    items = E.read_test_split(tiny["data"])                               # latent_steps 2, 3, 1, 2: K = 1 alone
    args = E.get_args(["--ckpt", "x", "--data", "d", "--out", "o", "--k", "sample", "--probe"])
    with pytest.raises(E.EvalError, match="latent_steps 1 has one test item"):
        E.run_probes(None, None, items, args, torch.device("cpu"))


# ----------------------------------------------------------------------------------------------------
# The pointing game (--pointing)
# ----------------------------------------------------------------------------------------------------
def _mask(path, w, h, box):
    a = np.zeros((h, w), np.uint8)
    x0, y0, x1, y1 = box
    a[y0:y1, x0:x1] = 255
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(a).save(path)
    return path


def test_target_patches_by_hand(tmp_path):
    # 112 x 112 on an 8 x 8 grid (14 px patches): a block inside patch (row 2, col 3) -> that patch and its
    # 8 neighbours (dilation by one patch)
    target, valid = E.target_patches(_mask(str(tmp_path / "m.png"), 112, 112, (45, 30, 50, 40)), 8)
    assert sorted(torch.nonzero(target).flatten().tolist()) == [r * 8 + c for r in (1, 2, 3) for c in (2, 3, 4)]
    assert valid.all()
    # a wide image is padded to a square: only the middle rows are image; a corner block touches patch (2, 0)
    target, valid = E.target_patches(_mask(str(tmp_path / "w.png"), 112, 56, (0, 0, 3, 3)), 8)
    assert sorted(torch.nonzero(valid).flatten().tolist()) == list(range(16, 48))
    assert sorted(torch.nonzero(target).flatten().tolist()) == [r * 8 + c for r in (1, 2, 3) for c in (0, 1)]


def test_pointing_game_counts_hits_and_chance(tiny, monkeypatch):
    """Masks on the test images; a visual projector that points at the target's patch must score 100%, one
    that points at a far corner 0%; chance is the hit area's share, recomputed here."""
    import shutil
    data = os.path.join(tiny["root"], "data_masks")
    shutil.copytree(tiny["data"], data)
    rows = [json.loads(l) for l in open(os.path.join(data, "samples.jsonl"))]
    for r in rows:  # the planted bright block of write_image: rows h/4..h/2, columns w/2..3w/4 of 64 x 48
        r["mask"] = "masks/" + os.path.basename(r["image"])
        _mask(os.path.join(data, r["mask"]), 64, 48, (32, 12, 48, 24))
    with open(os.path.join(data, "samples.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    g = 8
    target, valid = E.target_patches(os.path.join(data, rows[1]["mask"]), g)
    chance = 100 * target[valid].float().mean().item()
    inside = int(torch.nonzero(target & valid)[0])
    far = int(torch.nonzero(valid & ~target)[-1])
    real_heat = RE.heatmaps

    def pointing_at(index):
        def heat(f, v, grid):  # the real heatmap, then the chosen patch made the maximum
            h = real_heat(f, v, grid).clone().flatten(1)
            h[:, index] = 2.0
            return h.view(-1, grid, grid)
        return heat
    for index, expected in ((inside, 100.0), (far, 0.0)):
        monkeypatch.setattr(RE, "heatmaps", pointing_at(index))
        out = os.path.join(tiny["root"], f"ev_point_{index}")
        E.main(["--ckpt", tiny["ckpt"], "--data", data, "--out", out, "--max-new-tokens", "2", "--pointing"])
        res = json.loads(open(os.path.join(out, "pointing.json")).read(),
                         parse_constant=lambda c: (_ for _ in ()).throw(ValueError(c)))
        assert res["n"] == 4 and [s["k"] for s in res["steps"]] == [1, 2, 3, 4]
        assert all(s["hit_rate"] == expected for s in res["steps"]) and res["best_hit_rate"] == expected
        assert res["chance"] == pytest.approx(chance) and 0 < chance < 100
        # the tiny data has no ROI bank: no ceiling, and the reason names the file
        assert res["ceiling"] is None and "roi.safetensors: no such file" in res["ceiling_missing"]
    monkeypatch.setattr(RE, "heatmaps", real_heat)
    # the ceiling's queries are the items' own ROI rows (the heatmap below reads only the query): plant a row
    # that points inside for the items at even positions of the test split and one that points far outside
    # for the others -> 50%, whatever the batch
    from safetensors import safe_open
    from safetensors.torch import save_file
    items = E.read_test_split(data)
    with safe_open(os.path.join(tiny["ckpt"], "scaffold.safetensors"), "pt") as f:
        d_v = f.get_slice("vp.out.weight").get_shape()[0]
    good, bad = F.normalize(torch.ones(d_v), dim=0), F.normalize(-torch.ones(d_v), dim=0)

    def by_query(f, v, grid):  # the planted `good` row peaks inside; every other query (bad, VP(h_k)) far
        h = torch.zeros(len(v), grid * grid)
        for q in range(len(v)):
            h[q, inside if torch.allclose(v[q].float(), good) else far] = 1.0
        return h.view(-1, grid, grid)
    monkeypatch.setattr(RE, "heatmaps", by_query)
    roi_path = os.path.join(data, "roi.safetensors")

    def play(*flags):
        return E.pointing_game(tiny["ckpt"], items, 4, E.get_args(["--ckpt", "x", "--data", data, "--out", "o",
                                                                   "--pointing", *flags]),
                               torch.device("cpu"), torch.float32)

    def bank(rows, ids):
        save_file({"roi": rows.contiguous()}, roi_path, metadata={"ids": json.dumps(ids)})
    ids = [it["id"] for it in items]
    bank(torch.stack([good if j % 2 == 0 else bad for j in range(len(items))]), ids)
    for bs in ("1", "3"):
        res = play("--batch-size", bs)
        assert res["ceiling"] == 100 * sum(j % 2 == 0 for j in range(len(items))) / len(items)
        assert res["best_hit_rate"] == 0.0  # the latents' heatmaps are untouched by the planted rows
    bank(torch.stack([good] * (len(items) - 1)), ids[:-1])  # a test item without a row
    res = play()
    assert res["ceiling"] is None and f"no row for 1 test item(s), e.g. '{ids[-1]}'" in res["ceiling_missing"]
    assert "| n/a |" in E.pointing_table(res)
    bank(torch.ones(len(items), d_v + 1), ids)  # a bank from another encoder
    res = play()
    assert res["ceiling"] is None and f"{d_v + 1}-d features, the checkpoint's are {d_v}-d" in res["ceiling_missing"]
    monkeypatch.setattr(RE, "heatmaps", real_heat)
    with pytest.raises(E.EvalError, match="with a mask"):  # the tiny data has no masks
        E.pointing_game(tiny["ckpt"], E.read_test_split(tiny["data"]), 4,
                        E.get_args(["--ckpt", "x", "--data", tiny["data"], "--out", "o", "--pointing"]),
                        torch.device("cpu"), torch.float32)
    with pytest.raises(SystemExit):
        E.get_args(["--ckpt", "x", "--data", "d", "--out", "o", "--k", "0", "--pointing"])


def test_pointing_game_scores_a_walk_step_against_its_own_lesion(tiny, monkeypatch):
    """An item with step_masks (the walk): step k's hit counts against the lesion move k lands on; past its
    last move, the item's mask. Step 1's lesion is far from the mask's; a heatmap that peaks on the mask's
    patch misses at step 1 and hits at steps 2-4, and one that peaks on step 1's lesion the other way round."""
    import shutil
    data = os.path.join(tiny["root"], "data_steps")
    shutil.copytree(tiny["data"], data)
    rows = [json.loads(l) for l in open(os.path.join(data, "samples.jsonl"))]
    for r in rows:  # 64 x 48 images: the mask in the right half, move 1's lesion in the upper left corner
        stem = "masks/" + os.path.splitext(os.path.basename(r["image"]))[0]
        r["mask"], r["step_masks"] = stem + ".png", [stem + "-move1.png", stem + ".png"]
        _mask(os.path.join(data, r["mask"]), 64, 48, (32, 12, 48, 24))
        _mask(os.path.join(data, r["step_masks"][0]), 64, 48, (0, 0, 8, 8))
    with open(os.path.join(data, "samples.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    target, valid = E.target_patches(os.path.join(data, rows[0]["mask"]), 8)
    first, _ = E.target_patches(os.path.join(data, rows[0]["step_masks"][0]), 8)
    assert not (target & first).any()
    real_heat = RE.heatmaps
    for index, expected in ((int(torch.nonzero(target & valid)[0]), [0.0, 100.0, 100.0, 100.0]),
                            (int(torch.nonzero(first & valid)[0]), [100.0, 0.0, 0.0, 0.0])):
        def heat(f, v, grid):
            h = real_heat(f, v, grid).clone().flatten(1)
            h[:, index] = 2.0
            return h.view(-1, grid, grid)
        monkeypatch.setattr(RE, "heatmaps", heat)
        res = E.pointing_game(tiny["ckpt"], E.read_test_split(data), 4,
                              E.get_args(["--ckpt", "x", "--data", data, "--out", "o", "--pointing"]),
                              torch.device("cpu"), torch.float32)
        assert [s["hit_rate"] for s in res["steps"]] == expected and res["n_step_masks"] == res["n"] == 4
        chance = (target[valid].float().mean() * 3 + first[valid].float().mean()) / 4  # steps 1-4's own targets
        assert res["chance"] == pytest.approx(100 * chance.item())
        assert "4 walk items: step k scored against the lesion move k lands on" in E.pointing_table(res)


def test_pointing_game_at_each_items_own_k(tiny, monkeypatch):
    """--k sample: each item runs its own latent_steps and step k is scored over the items that have a step k.
    Two items of one move, two of two; step 1's lesion in a corner, step 2's (the mask) far from it. A heatmap
    that peaks on step 1's lesion hits step 1 on all four and step 2 on none of the two that have it."""
    import shutil
    data = os.path.join(tiny["root"], "data_own_k")
    shutil.copytree(tiny["data"], data)
    rows = [json.loads(l) for l in open(os.path.join(data, "samples.jsonl"))]
    tests = [r for r in rows if r["split"] == "test"]
    assert len(tests) == 4
    for j, r in enumerate(tests):
        stem = "masks/" + os.path.splitext(os.path.basename(r["image"]))[0]
        r["mask"], r["step_masks"] = stem + ".png", [stem + "-move1.png", stem + ".png"][:1 + j % 2]
        r["latent_steps"] = len(r["step_masks"])
        _mask(os.path.join(data, r["mask"]), 64, 48, (32, 12, 48, 24))
        _mask(os.path.join(data, stem + "-move1.png"), 64, 48, (0, 0, 8, 8))
        if j % 2 == 0:  # one move: its mask is move 1's lesion
            r["mask"] = stem + "-move1.png"
    with open(os.path.join(data, "samples.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    first, valid = E.target_patches(os.path.join(data, tests[0]["step_masks"][0]), 8)
    real_heat = RE.heatmaps
    index = int(torch.nonzero(first & valid)[0])

    def heat(f, v, grid):
        h = real_heat(f, v, grid).clone().flatten(1)
        h[:, index] = 2.0
        return h.view(-1, grid, grid)
    monkeypatch.setattr(RE, "heatmaps", heat)
    args = E.get_args(["--ckpt", "x", "--data", data, "--out", "o", "--pointing", "--k", "sample"])
    res = E.pointing_game(tiny["ckpt"], E.read_test_split(data), args.k, args, torch.device("cpu"), torch.float32)
    assert [(s["k"], s["hit_rate"], s["n"]) for s in res["steps"]] == [(1, 100.0, 4), (2, 0.0, 2)]
    assert res["best_step"] == 1 and res["n"] == 4
    assert "| items with the step | 4 | 2 |" in E.pointing_table(res)
