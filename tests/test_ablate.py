"""demo/ablate.py --suite evidence: the tables are computed from the per-seed results as they say
(means, sample std, VITAL - K=0 with the pooled std), checked against numbers worked out by hand."""
import json
import os
from types import SimpleNamespace

from demo import ablate as A


def test_evidence_tables_by_hand(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    rows = [dict(id=f"t{i}", split="test", choices=["a", "b", "c", "d"], question_type="reasoning")
            for i in range(4)]
    (data / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    res = {"VITAL": {s: {"by_type": {"all": a, "reasoning": r}, "probe normal": a, "probe zero": z,
                         "probe h0": a, "probe shuffled": a - 1, "collapse": c, "pointing best": p,
                         "pointing chance": 20.0, "pointing ceiling": p + 30,
                         **{f"pointing step {k}": p - k for k in range(1, 5)}}
                     for s, a, r, z, c, p in ((0, 40.0, 50.0, 30.0, 0.70, 60.0), (1, 44.0, 54.0, 31.0, 0.72, 62.0))},
           "K=0": {s: {"by_type": {"all": a, "reasoning": r}} for s, a, r in ((0, 38.0, 40.0), (1, 40.0, 40.0))},
           "pause": {s: {"by_type": {"all": 41.0, "reasoning": 50.0}} for s in (0, 1)},
           "task-only": {s: {"by_type": {"all": 39.0, "reasoning": 45.0}, "collapse": c}
                         for s, c in ((0, 0.95), (1, 0.93))}}
    args = SimpleNamespace(seeds=[0, 1], lora_r=64, lora_alpha=128, lr=3e-3, data=str(data))
    md = A.evidence_tables(args, res, {"all": 31.0, "reasoning": 0.0})
    assert "| VITAL | 42.0 ± 2.8 | 52.0 ± 2.8 | 40.0 / 44.0 |" in md         # mean ± sample std, per seed
    assert "| K=0 | 39.0 ± 1.4 | 40.0 ± 0.0 | 38.0 / 40.0 |" in md
    # VITAL - K=0: all +3.0, pooled std sqrt((2.83^2 + 1.41^2) / 2) = 2.2; reasoning +12.0, pooled 2.0
    assert "| all | +3.0 | 2.2 | +2.0 / +4.0 |" in md and "| reasoning | +12.0 | 2.0 | +10.0 / +14.0 |" in md
    # VITAL - pause arm, its own table after VITAL - K=0: all +1.0, pooled sqrt((2.83^2 + 0) / 2) = 2.0
    pause = md.split("minus the pause arm")[1]
    assert "| all | +1.0 | 2.0 | -1.0 / +3.0 |" in pause and "| reasoning | +2.0 | 2.0 | +0.0 / +4.0 |" in pause
    assert "| zero | 30.5 ± 0.7 | -11.5 |" in md and "| shuffled | 41.0 ± 2.8 | -1.0 |" in md
    # pointing: steps 1-4, best step, chance, ceiling (the ROI targets' own hit rate)
    assert ("| VITAL | 60.0 ± 1.4 | 59.0 ± 1.4 | 58.0 ± 1.4 | 57.0 ± 1.4 | 61.0 ± 1.4 | 20.0 ± 0.0 | 91.0 ± 1.4 |"
            in md)
    assert "| task-only | 0.940 ± 0.014 | 0.950 / 0.930 |" in md and "| VITAL | 0.710 ± 0.014 |" in md and "| chance | 25.0 |" in md
    assert "| backbone alone (no LoRA, K = 0; one evaluation) | 31.0 | 0.0 |" in md


def test_random_encoder_row_is_extracted_like_the_data(tmp_path):
    """The random-encoder copy of the data gets the ROI settings of the bank it is compared with."""
    import torch
    from safetensors.torch import save_file
    path = str(tmp_path / "roi.safetensors")
    save_file({"roi": torch.zeros(1, 2)}, path, metadata={"ids": "[]", "tau": "0.0", "delta": "0.05",
                                                          "min_crop": "32", "grid": "8"})
    assert A.roi_settings(path) == ["--tau", "0.0", "--delta", "0.05", "--min-crop", "32"]
