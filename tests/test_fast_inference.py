"""The fast inference path (pipeline/fast_inference.py: a static KV cache, fixed-shape steps) gives the tokens
of model.generate: identical ids and the same latent states, for K = 0..4, one prompt and a left-padded batch
of two image sizes, on a tiny backbone with a trained-looking LoRA merged in."""
import os

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import DynamicCache, StaticCache

import model as M
from embedded.tiny import make_tiny
from pipeline import fast_inference as FI
from pipeline import io as IO

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def backbone(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("tiny"))
    make_tiny(folder)
    bb, proc = IO.load_backbone(os.path.join(folder, "backbone"))
    torch.manual_seed(0)
    M.add_lora(bb, r=8, alpha=16)
    for m in M.lora_layers(bb):
        torch.nn.init.normal_(m.lora_B, std=0.05)
    M.set_lora_merged(bb, True)
    rng = np.random.default_rng(0)
    imgs = [Image.fromarray((rng.random((h, w, 3)) * 255).astype(np.uint8)) for h, w in ((96, 96), (64, 160))]
    return bb, proc, imgs


@pytest.mark.parametrize("K", [0, 1, 2, 3, 4])
def test_fast_generate_gives_model_generates_tokens(backbone, K):
    bb, proc, imgs = backbone
    eos = proc.tokenizer.convert_tokens_to_ids("<|im_end|>")
    questions = ["Describe this image.", "Where is the lesion located in this CT image?"]
    for n in (1, 2):  # one prompt, then a left-padded batch
        prefix = IO.build_prefix(proc, imgs[:n], questions[:n])
        ref, st = M.generate(bb, prefix, K, eos, 12)
        fast, fst = FI.fast_generate(bb, prefix, K, eos, 12, static=True)  # what a GPU runs
        assert torch.equal(ref, fast)
        assert isinstance(fst.cache, StaticCache) and fst.mask.shape[1] == prefix["input_ids"].shape[1] + K + 12
        assert len(fst.h) == K + 1
        assert max((a - b).abs().max().item() for a, b in zip(st.h, fst.h)) < 1e-5
        assert torch.equal(fst.next_pos, st.next_pos)


def test_the_cpu_default_is_model_generate(backbone):
    """Uncompiled, a static cache only costs (bench/loop.py), so on the CPU fast_generate is model.generate."""
    bb, proc, imgs = backbone
    eos = proc.tokenizer.convert_tokens_to_ids("<|im_end|>")
    prefix = IO.build_prefix(proc, imgs[:1], ["Describe this image."])
    ids, st = FI.fast_generate(bb, prefix, 2, eos, 8)
    assert isinstance(st.cache, DynamicCache) and not isinstance(st.cache, StaticCache)
    assert torch.equal(ids, M.generate(bb, prefix, 2, eos, 8)[0])
