import json

from lora_lab.data.json_extraction import KEYS, evaluate_extractions, json_extraction_dataset, parse_json_object


def test_dataset_is_deterministic_disjoint_and_consistent():
    train, val = json_extraction_dataset(n_train=300, n_val=50, seed=7)
    assert (train, val) == json_extraction_dataset(n_train=300, n_val=50, seed=7)
    assert train != json_extraction_dataset(n_train=300, n_val=50, seed=8)[0]
    assert len(train) == 300 and len(val) == 50
    assert not {s["input"] for s in train} & {s["input"] for s in val}
    for s in train + val:
        target = json.loads(s["output"])
        assert tuple(target) == KEYS
        assert {"positive": {4, 5}, "neutral": {3}, "negative": {1, 2}}[target["sentiment"]] >= {target["rating"]}
        assert (target["issue"] == "none") == (target["sentiment"] != "negative")
        # the review states the rating, as a digit or a word
        assert str(target["rating"]) in s["input"] or ["One", "Two", "Three", "Four", "Five"][target["rating"] - 1] in s["input"]
    assert {json.loads(s["output"])["sentiment"] for s in train} == {"positive", "neutral", "negative"}


def test_evaluation_scores_validity_schema_and_values():
    target = json.dumps({"product": "blender", "sentiment": "neutral", "issue": "none", "rating": 3})
    gens = [
        target,  # right
        '{"product": "blender", "sentiment": "neutral", "issue": "none", "rating": 3}\nextra text',  # right, trailing text
        '{"product": "blender", "sentiment": "positive", "issue": "none", "rating": 3}',  # one value wrong
        '{"product": "blender", "sentiment": "neutral", "rating": 3}',  # a key missing
        '{"product": "blender", "sentiment": "neutral"',  # not valid JSON
        '[1, 2]',  # valid JSON, not an object
    ]
    scores = evaluate_extractions(gens, [target] * len(gens))
    assert scores["valid_json"] == 4 / 6
    assert scores["exact_keys"] == 3 / 6
    assert scores["all_correct"] == 2 / 6
    assert scores["sentiment_correct"] == 3 / 6 and scores["issue_correct"] == 3 / 6
    assert parse_json_object("  not json") is None
