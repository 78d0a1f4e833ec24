"""pipeline/training_data.prefetch: train.py's next micro-batch built on a second thread while the model computes;
the same batches in the same order as built in line."""
import json
import os
import threading

import pytest

from pipeline.training_data import prefetch


def test_the_same_items_in_order_and_built_ahead_on_another_thread():
    built, where = [], set()
    started = threading.Event()

    def build(x):
        built.append(x)
        where.add(threading.current_thread().name)
        if x == 1:
            started.set()
        return x * x

    it = prefetch(build, iter(range(5)))
    assert next(it) == 0
    assert started.wait(5)  # item 1 is being built before the caller asks for it
    assert list(it) == [1, 4, 9, 16]
    assert built == [0, 1, 2, 3, 4] and all(n.startswith("prefetch") for n in where)


def test_a_builds_error_reaches_the_caller_at_its_item():
    def build(x):
        if x == 2:
            raise ValueError("bad item 2")
        return x

    it = prefetch(build, iter(range(4)))
    assert [next(it), next(it)] == [0, 1]
    with pytest.raises(ValueError, match="bad item 2"):
        next(it)


def test_a_loop_that_stops_early_leaves_no_thread_behind():
    it = prefetch(lambda x: x, iter(range(100)))
    assert next(it) == 0
    it.close()  # train_loop's break at --max-steps
    assert not any(t.name.startswith("prefetch") and t.is_alive() for t in threading.enumerate())


def test_a_checkpoint_that_saves_the_processor_every_step_while_the_next_batch_builds(tmp_path):
    """demo/pretrain.py writes the processor (its tokenizer) into every checkpoint while train.py builds the next batch
    on the prefetch thread: that thread has a processor of its own, and six saves, one a step, all load."""
    from demo import pretrain
    from embedded.tiny import make_tiny
    from pipeline import io as IO
    from test_evaluate import write_data
    models, data, out = (str(tmp_path / x) for x in ("models", "data", "run"))
    make_tiny(models)
    write_data(data)
    pretrain.main(["--data", data, "--models", models, "--out", out, "--epochs", "6", "--save-every", "1"])
    phase = os.path.join(out, "phase1")
    assert json.load(open(os.path.join(phase, "config.json")))["step"] == 6
    tok = IO.AutoTokenizer.from_pretrained(os.path.join(phase, "backbone"))
    assert tok("the liver").input_ids and len(tok) == 911
