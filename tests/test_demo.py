"""The shipped stand-ins (embedded/pretrained/, copied by embedded/default.py): the files are the ones their
manifest lists, they load through the same from_pretrained path as a real checkpoint, the default demo settings
select them, a run with other settings or --rebuild-stand-ins does not, and a damaged file is refused by name;
demo/run.py --ship writes a manifest that the copy reads back."""
import json
import os
import shutil

import pytest
import torch

import model as M

from pipeline import io as IO
from demo import run as R
from embedded import default as D

MANIFEST = os.path.join(D.SHIPPED, "stand_ins.json")


def paths_in(folder):
    return dict(out=str(folder), pretrain=str(folder / "pretrain"),
                encoder_pretrained=str(folder / "encoder_pretrained"))


def test_shipped_files_match_the_manifest_and_load():
    manifest = json.load(open(MANIFEST))
    defaults = R.get_args([])
    for name, keys in D.STAND_INS.items():
        entry = manifest[name]
        assert entry["args"] == {k: getattr(defaults, k) for k in keys}  # what `bash demo.sh` asks for
        for rel, digest in entry["files"].items():
            assert D.sha256(os.path.join(D.SHIPPED, name, rel)) == digest, rel
        assert "log.jsonl" not in entry["files"] and entry["commands"][-1].startswith("python demo/")
    ckpt = os.path.join(D.SHIPPED, "pretrain", "phase1")
    assert json.load(open(os.path.join(ckpt, "config.json")))["args"]["pretrain"] is True  # evaluate: alone
    backbone, processor = IO.load_backbone(os.path.join(ckpt, "backbone"), dtype=torch.float32, device="cpu")
    assert backbone.config.text_config.hidden_size == 64 and processor.tokenizer is not None
    encoder, _ = IO.load_encoder(os.path.join(D.SHIPPED, "encoder_pretrained"), dtype=torch.float32, device="cpu")
    assert encoder.config.image_size == 112


def test_copy_takes_only_the_stand_ins_made_with_this_runs_settings(tmp_path, capsys):
    run = tmp_path / "run"
    assert D.copy_shipped(R.get_args([]), paths_in(run)) == ["pretrain", "encoder_pretrained"]
    assert D.stand_in_done("pretrain", paths_in(run)) and D.stand_in_done("encoder_pretrained", paths_in(run))
    assert not (run / "pretrain" / "log.jsonl").exists() and not list(run.glob("*.part"))
    assert D.copy_shipped(R.get_args([]), paths_in(run)) == []  # already there: kept, not copied again

    other = tmp_path / "other"
    args = R.get_args(["--six-types", "--pretrain-epochs", "5"])
    assert D.copy_shipped(args, paths_in(other)) == ["encoder_pretrained"]
    assert "--pretrain-epochs 5.0 (shipped: 6)" in capsys.readouterr().out
    assert D.copy_shipped(R.get_args(["--six-types", "--rebuild-stand-ins"]), paths_in(tmp_path / "r")) == []
    with pytest.raises(SystemExit, match="is the shipped stand-in copied by an earlier run"):
        D.copy_shipped(R.get_args(["--six-types", "--rebuild-stand-ins"]), paths_in(run))  # it would not rebuild
    random = R.get_args(["--six-types", "--encoder", "random", "--pretrain-epochs", "0"])
    assert D.copy_shipped(random, paths_in(tmp_path / "none")) == []  # neither stand-in is needed


def test_a_damaged_shipped_file_is_refused_by_name(tmp_path):
    shipped = tmp_path / "shipped"
    shutil.copytree(D.SHIPPED, shipped)
    weights = shipped / "encoder_pretrained" / "model.safetensors"
    weights.write_bytes(b"version https://git-lfs.github.com/spec/v1\n")  # what an LFS checkout leaves
    run = tmp_path / "run"
    with pytest.raises(SystemExit, match="encoder_pretrained/model.safetensors: missing or not the file"):
        D.copy_shipped(R.get_args([]), paths_in(run), shipped=str(shipped))
    assert not (run / "encoder_pretrained").exists()  # never half a stand-in in the run folder


def test_ship_writes_a_manifest_that_copy_reads_back(tmp_path):
    run = tmp_path / "run"
    D.copy_shipped(R.get_args([]), paths_in(run))
    (run / "pretrain" / "log.jsonl").write_text("{}\n")  # a run's per-step log is not shipped
    with pytest.raises(SystemExit):
        R.get_args(["--six-types", "--ship"])  # refused before the run: it would ship copies of the shipped ones
    args, shipped = R.get_args(["--out", str(run)]), tmp_path / "shipped"
    paths = dict(paths_in(run), models=str(run / "models"), pretrain_data=str(run / "pretrain_data"))
    with pytest.raises(SystemExit, match="--ship needs stand-ins trained by this run"):
        R.ship(args, paths, {}, shipped=str(shipped))
    R.ship(args, paths, {"pretrain": 12.0, "pretrain encoder": 3.0}, shipped=str(shipped))
    mine, theirs = json.load(open(shipped / "stand_ins.json")), json.load(open(MANIFEST))
    for name in D.STAND_INS:
        assert mine[name]["files"] == theirs[name]["files"] and mine[name]["args"] == theirs[name]["args"]
    assert mine["pretrain"]["seconds"] == 12.0
    assert D.copy_shipped(R.get_args([]), paths_in(tmp_path / "again"), shipped=str(shipped)) == \
        ["pretrain", "encoder_pretrained"]


def test_the_machine_line_names_the_cpu_model_not_only_the_cores(tmp_path):
    """Figures travel between CPUs that train differently: results name the CPU model, family, model and the
    widest vector unit (demo/run.py machine())."""
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 25\nmodel\t\t: 17\n"
                    "model name\t: AMD EPYC 9B14\nflags\t\t: fpu sse2 avx2 avx512f\n\n"
                    "processor\t: 1\nmodel name\t: another\n")
    line = R.machine(str(info))
    assert line.startswith("AMD EPYC 9B14 (family 25, model 17, avx512f), ")
    assert f", {os.cpu_count()} cores, torch {torch.__version__}" in line
    info.write_text("model name\t: Some CPU\nflags\t\t: fpu sse2 avx2\n")
    assert R.machine(str(info)).startswith("Some CPU (avx2), ")
    assert "cores" in R.machine(str(tmp_path / "absent"))


def test_the_shipped_order_stand_in_matches_its_manifest_and_walk_copies_it(tmp_path, monkeypatch):
    """demo/walk.py --task order copies embedded/pretrained/order_pretrain (its own stages, run once) instead of
    training it for 31 minutes: the files are the manifest's and load; a run folder that has one keeps it; the walk
    and --rebuild-stand-in copy nothing; a damaged file is refused by name before anything is copied."""
    from demo import walk as W
    entry = json.load(open(MANIFEST))[W.ORDER_STAND_IN]
    assert "log.jsonl" not in entry["files"] and entry["commands"][-1].startswith("python demo/pretrain.py")
    for rel, digest in entry["files"].items():
        assert D.sha256(os.path.join(D.SHIPPED, W.ORDER_STAND_IN, rel)) == digest, rel
    backbone, _ = IO.load_backbone(os.path.join(D.SHIPPED, W.ORDER_STAND_IN, "phase1", "backbone"),
                                   dtype=torch.float32, device="cpu")
    assert backbone.config.text_config.hidden_size == 64
    order = W.get_args(["--task", "order", "--out", str(tmp_path / "run")])
    assert W.copy_stand_in(order) is True
    assert D.sha256(str(tmp_path / "run" / "pretrain" / "phase1" / "backbone" / "model.safetensors")) == \
        entry["files"]["phase1/backbone/model.safetensors"]
    stand_in_stages = [c for c, done in W.stages(order) if c[1] == "demo/pretrain.py" or "--look-cells" in c
                       and "--seed" in c and c[c.index("--seed") + 1] == "1"]
    assert len(stand_in_stages) == 2 and all(os.path.exists(done) for c, done in W.stages(order)
                                              if c in stand_in_stages)  # neither its corpus nor its training runs
    assert W.copy_stand_in(order) is False  # there already: kept
    assert W.copy_stand_in(W.get_args(["--task", "order", "--rebuild-stand-in", "--out", str(tmp_path / "r")])) is False
    assert W.copy_stand_in(W.get_args(["--out", str(tmp_path / "w")])) is False  # the walk has no shipped stand-in
    shipped = tmp_path / "shipped"
    shutil.copytree(D.SHIPPED, shipped)
    (shipped / W.ORDER_STAND_IN / "phase1" / "backbone" / "model.safetensors").write_bytes(b"not the weights")
    with pytest.raises(SystemExit, match="order_pretrain/phase1/backbone/model.safetensors: missing or not the file"):
        W.copy_stand_in(W.get_args(["--task", "order", "--out", str(tmp_path / "bad")]), shipped=str(shipped))
    assert not (tmp_path / "bad" / "pretrain").exists()


def test_ship_keeps_the_stand_ins_it_does_not_make(tmp_path):
    """--ship replaces the demo's two stand-ins and leaves walk.py's order_pretrain (folder and manifest entry)."""
    run = tmp_path / "run"
    D.copy_shipped(R.get_args([]), paths_in(run))
    shipped = tmp_path / "shipped"
    shutil.copytree(D.SHIPPED, shipped)
    paths = dict(paths_in(run), models=str(run / "models"), pretrain_data=str(run / "pretrain_data"))
    R.ship(R.get_args(["--out", str(run)]), paths, {"pretrain": 1.0, "pretrain encoder": 1.0}, shipped=str(shipped))
    mine, theirs = json.load(open(shipped / "stand_ins.json")), json.load(open(MANIFEST))
    assert mine["order_pretrain"] == theirs["order_pretrain"] and mine["pretrain"]["seconds"] == 1.0
    assert (shipped / "order_pretrain" / "phase1" / "backbone" / "model.safetensors").is_file()


def test_the_demo_is_the_order_question_unless_six_types(capsys):
    """demo.sh's default is stage 7 alone (the order question, about 16 min): a setting of the six question types
    without --six-types would change nothing, so it is refused by name; --out and --seed are the order question's."""
    assert not R.get_args([]).six_types and R.get_args(["--seed", "3", "--out", "x"]).seed == 3
    for argv, named in ((["--n", "100"], "--n"), (["--skip-order"], "--skip-order"),
                        (["--epochs", "1", "1", "1", "--encoder", "random"], "--epochs, --encoder")):
        with pytest.raises(SystemExit):
            R.get_args(argv)
        assert f"{named}: settings of the six question types" in capsys.readouterr().err
    args = R.get_args(["--six-types", "--n", "100", "--skip-order"])
    assert args.n == 100 and args.skip_order
    # the two demos' results are two files: the default's does not overwrite the six types' tables
    assert R.results_file(R.get_args([])) == os.path.join(R.HERE, "results.md")
    assert R.results_file(args) == os.path.join(R.HERE, "results_six_types.md")
