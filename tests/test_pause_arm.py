"""The pause arm (train.py --feedback pause): latent step k is fed a learned constant instead of h_{k-1}. It is
trained, saved with the adapter, and fed the same way by evaluate.py and explain.py; it cannot be mixed up with a
checkpoint of the method."""
import os

import pytest
import torch
from safetensors.torch import load_file

import evaluate as E
import model as M
import train
from embedded.tiny import make_tiny
from pipeline import io as IO
from pipeline import scaffolds as SC
from tests.test_train import flags, write_fixture

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("pause")
    env = dict(models=make_tiny(str(base / "models")), data=str(base / "data"))
    write_fixture(env["data"])
    train.main(flags(env, base / "pause", "--phase", 1, "--feedback", "pause", "--max-k", 3, "--lr", 3e-3))
    train.main(flags(env, base / "state", "--phase", 1, "--max-k", 3))
    return env, base


def test_pause_constants_train_and_travel_with_the_adapter(runs):
    env, base = runs
    ckpt = str(base / "pause" / "phase1")
    adapter = load_file(os.path.join(ckpt, "adapter.safetensors"))
    d = M.VITAL(IO.load_backbone(os.path.join(env["models"], "backbone"))[0]).backbone.config.text_config.hidden_size
    assert adapter["pause"].shape == (3, d)  # --max-k rows
    assert IO.pause_rows(ckpt) == 3 and IO.pause_rows(str(base / "state" / "phase1")) == 0
    bb, processor = IO.load_backbone(os.path.join(env["models"], "backbone"))
    vital = M.VITAL(bb, pause_steps=3)
    prefix = IO.build_prefix(processor, [IO.load_image(os.path.join(env["data"], "images", "0.png"))], ["why?"])
    M.latent_loop(bb, prefix, 2, vital.feed()).h[-1].sum().backward()  # what train.py's forward runs at K = 2
    g = vital.pause.grad.abs().sum(-1)
    assert g[0] > 0 and g[1] > 0 and g[2] == 0  # the steps run get gradients; the third was not run


def test_evaluate_and_explain_feed_the_trained_constants(runs):
    env, base = runs
    ckpt = str(base / "pause" / "phase1")
    pause = load_file(os.path.join(ckpt, "adapter.safetensors"))["pause"]
    backbone, processor, _, _ = E.load_inference_model(ckpt)
    feed = E.latent_feed(ckpt, "cpu")
    assert E.latent_feed(str(base / "state" / "phase1"), "cpu") is None
    prefix = IO.build_prefix(processor, [IO.load_image(os.path.join(env["data"], "images", "0.png"))],
                             ["is there a bright lesion in the image?"])
    with torch.no_grad():
        st = M.latent_loop(backbone, prefix, 3, feed)
        own = M.latent_loop(backbone, prefix, 3)
    # step k's input is pause[k-1]: the same states as feeding those constants by hand, unlike feeding h_{k-1}
    fed = []
    with torch.no_grad():
        M.latent_loop(backbone, prefix, 3, lambda k, s: fed.append(feed(k, s)) or fed[-1])
    assert all(torch.equal(x[0, 0], pause[k]) for k, x in enumerate(fed))
    assert (st.h[-1] - own.h[-1]).abs().max() > 1e-4
    vital, *_ = SC.load_explainer(ckpt, "cpu", torch.float32, IO.InputError)  # explain.py's loader
    assert torch.equal(vital.pause.detach(), pause)


def test_a_pause_checkpoint_is_not_loaded_as_the_method_nor_warm_started_across(runs):
    env, base = runs
    bb = IO.load_backbone(os.path.join(env["models"], "backbone"))[0]
    M.add_lora(bb, 4, 8)
    with pytest.raises(ValueError, match="pause"):
        IO.load_checkpoint(str(base / "pause" / "phase1"), M.VITAL(bb))
    with pytest.raises(ValueError, match="pause"):
        IO.load_checkpoint(str(base / "state" / "phase1"), M.VITAL(bb, pause_steps=3))
    with pytest.raises(train.TrainError, match="pause"):  # phase 2 of the method from the pause arm's phase 1
        train.main(flags(env, base / "mixed", "--phase", 2, "--max-k", 3,
                         "--init", str(base / "pause" / "phase1")))
