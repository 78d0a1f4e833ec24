"""Loading a model folder: on the CPU bit for bit what a plain from_pretrained gives; off the CPU the weights
go straight to the device."""
import os

import pytest
import torch
import transformers

from pipeline import io as IO
from embedded.tiny import make_tiny


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return str(make_tiny(str(tmp_path_factory.mktemp("tiny"))))


LOADERS = [(IO.load_backbone, "backbone", transformers.Qwen3VLForConditionalGeneration),
           (IO.load_decoder, "decoder", transformers.Qwen3ForCausalLM),
           (IO.load_encoder, "encoder", transformers.SiglipVisionModel)]


@pytest.mark.parametrize("load,sub,cls", LOADERS)
def test_cpu_loading_is_bit_identical_to_a_plain_from_pretrained(tiny, load, sub, cls):
    model = load(os.path.join(tiny, sub), device="cpu")[0]
    ref = cls.from_pretrained(os.path.join(tiny, sub), dtype=torch.float32)  # the plain loading, no device_map
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


def test_position_scale_changes_only_the_encoders_position_embeddings(tiny, tmp_path):
    """embedded/tiny.py --position-scale: the same weights, the encoder's position embeddings times the scale."""
    from safetensors.torch import load_file
    other = make_tiny(str(tmp_path / "pos3"), position_scale=3.0)
    for sub in ("backbone", "decoder", "encoder"):
        a, b = (load_file(os.path.join(f, sub, "model.safetensors")) for f in (tiny, other))
        assert a.keys() == b.keys()
        for k in a:
            want = 3.0 * a[k] if k.endswith("position_embedding.weight") else a[k]
            assert torch.equal(b[k], want), f"{sub}/{k}"
    assert any(k.endswith("position_embedding.weight") for k in a)  # the scale had something to act on
