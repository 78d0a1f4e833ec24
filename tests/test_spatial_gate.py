"""The teacher's spatial gate judges only the target: sentences about its neighbours pass, a wrong side said
of the target (in the answer, in a step that names it, or in an unnamed description) is rejected."""
import json

from pipeline import quality_gate as G

FACTS = {"cx": 0.2, "cy": 0.8, "h": "left", "v": "lower"}  # the target: lower left


def gate(answer, chain, target="spleen"):
    sample = {"question_type": "location", "target": target, "target_type": "organ", "negative": False}
    return G.gate(json.dumps({"final_answer": answer, "reasoning_chain": chain}), sample, FACTS)[1]


def test_gate_lets_sentences_about_neighbours_pass():
    assert gate("The spleen is in the lower left part of the image.",
                ["The liver lies to the right of the stomach, in the upper right part of the image.",
                 "The spleen sits below it, and the kidney lies to the left of the spleen."]) == []
    assert gate("The spleen is in the lower left part of the image.",  # a relation, not a position
                ["A small structure lies in the lower left.", "It lies left of the liver and right of the ribs."]) == []


def test_gate_still_rejects_a_wrong_side_about_the_target():
    wrong = "spatial: says 'right' but the target's center is at x=0.20, y=0.80"
    assert gate("The spleen is in the lower right part of the image.", ["a", "b"]) == [wrong]  # final answer
    assert gate("The spleen is in the lower left.", ["The liver is large, and the spleen is on the right.",
                                                     "b"]) == [wrong]                           # names the target
    assert gate("The spleen is in the lower left.", ["A bright structure is seen.",
                                                     "Its center lies in the right third of the image."]) == [wrong]
    assert gate("The spleen is in the lower left.", ["A structure fills the upper half.", "b"])[0].startswith(
        "spatial: says 'upper'")                                                                 # unnamed structure
