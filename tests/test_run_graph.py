"""embedded/default.run_graph: the demo's stages and runs started as soon as what they read is ready, the first
ready node in list order first, `jobs` at a time; a failure stops only what depends on it."""
import os
import sys
import threading

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from embedded.default import run_graph  # noqa: E402


def recorder():
    order = []
    return order, lambda name, value=None: (lambda: order.append(name) or value)


def test_one_job_takes_the_first_ready_node_in_list_order():
    order, node = recorder()
    done, failed = run_graph([("b", node("b", 2), ["a"]), ("a", node("a", 1), []), ("c", node("c", 3), [])], 1)
    assert order == ["a", "b", "c"]  # b waits for a, then comes before c, which is later in the list
    assert done == {"a": 1, "b": 2, "c": 3} and failed == {}


def test_a_failure_stops_what_depends_on_it_and_nothing_else():
    order, node = recorder()

    def boom():
        raise RuntimeError("a broke")
    done, failed = run_graph([("a", boom, []), ("b", node("b"), ["a"]), ("c", node("c"), ["b"]),
                              ("d", node("d"), [])], 1)
    assert order == ["d"] and set(done) == {"d"}
    assert set(failed) == {"a", "b", "c"} and all(str(e) == "a broke" for e in failed.values())


def test_two_jobs_run_side_by_side():
    """Each node waits at a barrier for the other: they finish only if both run at once."""
    barrier = threading.Barrier(2, timeout=10)
    done, failed = run_graph([("x", barrier.wait, []), ("y", barrier.wait, [])], 2)
    assert failed == {} and set(done) == {"x", "y"}


@pytest.mark.parametrize("nodes, says", [
    ([("a", print, ["z"])], "waits for ['z'], which no node makes"),
    ([("a", print, ["b"]), ("b", print, ["a"])], "wait for each other"),
    ([("a", print, []), ("a", print, [])], "share a name")])
def test_a_graph_that_cannot_run_is_refused_by_name(nodes, says):
    with pytest.raises(ValueError, match=says.replace("[", r"\[").replace("]", r"\]")):
        run_graph(nodes, 1)
