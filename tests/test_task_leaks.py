"""demo/task_leaks.py: what a reader that computes no hop gets from the true findings, on tasks whose answer is
known to be (or not to be) a low-degree function of them."""
import numpy as np
import pytest

from demo import task_leaks as T


def test_known_levels():
    rng = np.random.default_rng(0)
    # one move of the walk is one bit of the start cell: linear and quadratic read it whole
    one = T.levels(*T.draw("walk", 1, 1200, rng), 800)
    assert one["linear"] == one["quadratic"] == 100.0 and one["majority"] < 60
    # four moves: not linear, nearly quadratic, and the 512 patterns are mostly in an 800-item train split
    four = T.levels(*T.draw("walk", 4, 1200, rng), 800)
    assert four["majority"] + 15 < four["linear"] < 85 < four["quadratic"] and four["lookup"] > 75
    # two permutations of three tokens: a product of two findings, so quadratic and no better linear
    two = T.levels(*T.draw("s3", 2, 1200, rng), 800)
    assert two["quadratic"] == 100.0 and two["linear"] < 80
    # eight lesions read in order: every level within a few points of the most common order
    eight = T.levels(*T.draw("s3", 8, 1200, rng), 800)
    assert all(abs(eight[k] - eight["majority"]) < 8 for k in ("linear", "quadratic", "lookup")), eight


def test_the_s3_rule_by_hand():
    finds, starts, y = T.draw("s3", 3, 50, np.random.default_rng(1))
    for f, a in zip(finds, y):
        order = [0, 1, 2]
        for g in f:
            order = [order[i] for i in T.S3_MOVES[g]]
        assert T.ORDERS[a] == tuple(order)
    assert finds.shape == (50, 3) and not starts.any()
    with pytest.raises(SystemExit):
        T.main(["--hops", "10"])
