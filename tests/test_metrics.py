import numpy as np
import pytest

from vitfab.errors import VitfabError
from vitfab.evaluate import classification_metrics, good_classes


def onehot_logits(preds, n):
    logits = np.zeros((len(preds), n))
    logits[np.arange(len(preds)), preds] = 1.0
    return logits


def test_hand_computed_example():
    classes = ["good", "void", "crack"]
    targets = np.array([0, 0, 0, 0, 1, 1, 1, 2, 2, 2])
    preds = np.array([0, 0, 0, 1, 1, 1, 0, 2, 2, 1])
    m = classification_metrics(onehot_logits(preds, 3), targets, classes)
    assert m["confusion_matrix"] == [[3, 1, 0], [1, 2, 0], [0, 1, 2]]
    assert m["top1"] == pytest.approx(0.7)
    pc = m["per_class"]
    assert pc["good"]["precision"] == pytest.approx(3 / 4) and pc["good"]["recall"] == pytest.approx(3 / 4)
    assert pc["void"]["precision"] == pytest.approx(2 / 4) and pc["void"]["recall"] == pytest.approx(2 / 3)
    assert pc["crack"]["precision"] == pytest.approx(1.0) and pc["crack"]["recall"] == pytest.approx(2 / 3)
    f1 = [2 * p * r / (p + r) for p, r in [(0.75, 0.75), (0.5, 2 / 3), (1.0, 2 / 3)]]
    assert m["macro_f1"] == pytest.approx(np.mean(f1))
    # inspection-line rates: 1 of 6 defective images called good, 1 of 4 good images flagged
    assert m["good_class"] == "good"
    assert m["escape_rate"] == pytest.approx(1 / 6)
    assert m["overkill_rate"] == pytest.approx(1 / 4)
    assert "top5" not in m  # only with more than five classes


def test_top5_with_many_classes():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(200, 8))
    targets = rng.integers(0, 8, 200)
    m = classification_metrics(logits, targets, [f"c{i}" for i in range(8)])
    ranks = (logits > logits[np.arange(200), targets][:, None]).sum(1)
    assert m["top5"] == pytest.approx(np.mean(ranks < 5))
    assert m["top1"] == pytest.approx(np.mean(ranks == 0))
    assert "escape_rate" not in m  # no good class


def test_good_class_lookup():
    assert good_classes(["crack", "OK", "void"]) == [1]
    assert good_classes(["crack", "normal"]) == [1]
    assert good_classes(["a", "b"]) == []
    assert good_classes(["pass", "fail"], "pass") == [0]
    with pytest.raises(VitfabError, match="not one of the classes"):
        good_classes(["a", "b"], "good")
    with pytest.raises(VitfabError, match="every class"):
        good_classes(["a", "b"], "a,b")
