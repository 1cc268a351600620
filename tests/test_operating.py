"""The operating point (temperature, reject threshold), its bounds, and the metrics a requirement
may be stated in."""

import numpy as np
import pytest

from vitfab.errors import VitfabError
from vitfab.evaluate.metrics import classification_metrics, good_classes, metric_value
from vitfab.evaluate.operating import (Ceilings, OperatingPoint, calibration, candidate_thresholds,
                                       clopper_pearson_upper, fit_operating_point, fit_temperature, fit_threshold,
                                       images_needed, operating_metrics, p_good, paired_bootstrap, parse_min_recall,
                                       softmax, within_verdict)

CLASSES = ["good", "d1", "d2"]
# p_good of five good images and five defective ones (d1: 0.75, 0.3; d2: 0.5, 0.1, 0.05)
P = np.array([0.9, 0.8, 0.7, 0.6, 0.2, 0.75, 0.5, 0.3, 0.1, 0.05])
Y = np.array([0, 0, 0, 0, 0, 1, 2, 1, 2, 2])


def fit(**ceilings):
    return fit_threshold(P, Y, CLASSES, [0], Ceilings(**ceilings))


@pytest.mark.parametrize("ceilings, threshold, escape, overkill, met", [
    # one escape allowed: pass from just above 0.5 (the 0.75 defect passes, the 0.2 good part is flagged)
    (dict(max_escape=0.2, max_overkill=0.2), 0.55, 0.2, 0.2, True),
    (dict(max_escape=0.2, max_overkill=0.1), 0.55, 0.2, 0.2, False),  # the same point, overkill missed
    (dict(max_escape=0.0, max_overkill=0.6), 0.775, 0.0, 0.6, True),  # no escape: above the 0.75 defect
    (dict(max_escape=None, max_overkill=0.2), 0.55, 0.2, 0.2, True),  # least escape within 20 % overkill
    (dict(max_escape=None, max_overkill=0.0), 0.15, 0.6, 0.0, True),  # no overkill: pass from just above 0.1
    (dict(max_escape=0.4, max_overkill=0.2, min_recall={"d1": 1.0}), 0.775, 0.0, 0.6, False),  # the floor binds
])
def test_threshold_on_hand_made_probabilities(ceilings, threshold, escape, overkill, met):
    f = fit(**ceilings)
    assert f["threshold"] == pytest.approx(threshold)
    assert f["escape_rate"] == pytest.approx(escape) and f["overkill_rate"] == pytest.approx(overkill)
    assert f["met"] is met and (f["shortfall"] is None) is met
    passed = P >= f["threshold"]
    assert np.mean(passed[Y != 0]) == pytest.approx(escape) and np.mean(~passed[Y == 0]) == pytest.approx(overkill)


def test_shortfall_says_by_how_much():
    f = fit(max_escape=0.2, max_overkill=0.1)
    assert "needs 20.00 % overkill" in f["shortfall"] and "missed by 10.00 points" in f["shortfall"]
    assert "least escape is 60.00 %" in f["shortfall"]  # within 10 % overkill (no good part flagged): 3 of 5 pass


def test_candidate_thresholds_cover_every_pass_set():
    th = candidate_thresholds(np.array([0.2, 0.5, 0.5, 1.0]))
    sets = {tuple(np.array([0.2, 0.5, 0.5, 1.0]) >= t) for t in th}
    assert len(sets) == len(th) == 4  # all pass, >= 0.5, only 1.0, none


def test_temperature_scaling_recovers_a_known_temperature():
    rng = np.random.default_rng(0)
    z = rng.normal(size=(4000, 4)) * 2
    y = np.array([rng.choice(4, p=p) for p in softmax(z)])  # labels drawn from softmax(z): T = 1 is right for z
    for t in (0.5, 2.5):
        assert fit_temperature(z * t, y) == pytest.approx(t, rel=0.08)


def test_clopper_pearson_against_published_values():
    # exact one-sided 95 % upper bounds (e.g. Clopper & Pearson 1934 tables; 0 of 30 -> 9.5 %)
    for k, n, upper in [(0, 30, 0.0950), (0, 10, 0.2589), (1, 10, 0.3942), (2, 20, 0.2826), (5, 100, 0.1023)]:
        assert clopper_pearson_upper(k, n) == pytest.approx(upper, abs=1e-4)
    assert clopper_pearson_upper(3, 3) == 1.0 and clopper_pearson_upper(0, 0) is None
    n = images_needed(0.02)
    assert clopper_pearson_upper(0, n) <= 0.02 < clopper_pearson_upper(0, n - 1)
    assert images_needed(0.05) == 59


def test_operating_point_fitted_on_logits_and_decisions():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 3, 600)
    logits = rng.normal(size=(600, 3)) + 3 * np.eye(3)[y]
    op = fit_operating_point(logits, y, CLASSES, [0], Ceilings(max_escape=0.05, max_overkill=0.3))
    pg, passed = op.decide(logits, CLASSES)
    assert np.allclose(pg, p_good(logits, op.temperature, [0]))
    assert np.array_equal(passed, pg >= op.threshold)
    assert np.mean(passed[y != 0]) == pytest.approx(op.escape_rate) and op.escape_rate <= 0.05
    m = operating_metrics(op, logits, y, CLASSES)
    assert m["escapes"] == int(passed[y != 0].sum()) and m["n_good"] == int((y == 0).sum())
    assert m["escape_upper"] == pytest.approx(clopper_pearson_upper(m["escapes"], m["n_defective"]))
    assert OperatingPoint.from_dict(op.to_dict()) == op
    with pytest.raises(VitfabError, match="good and defective"):
        fit_operating_point(logits[y == 0], y[y == 0], CLASSES, [0], Ceilings(max_escape=0.05))


def test_ceilings_and_good_classes_refuse_bad_input():
    with pytest.raises(VitfabError, match=r"\[0, 100\]"):
        Ceilings.from_percent(150, None)
    with pytest.raises(VitfabError, match=r"\[0, 100\]"):
        Ceilings.from_percent(2, -1)
    with pytest.raises(VitfabError, match="CLASS=R"):
        parse_min_recall(["void"])
    assert parse_min_recall(["void=95", "crack=0.5"]) == {"void": 0.95, "crack": 0.5}
    c = Ceilings.from_percent(2, None, ["d1=0.9"])
    c.check(CLASSES, [0])
    with pytest.raises(VitfabError, match="need a good class"):
        c.check(["a", "b"], [])
    with pytest.raises(VitfabError, match="no such class"):
        Ceilings(min_recall={"nope": 0.5}).check(CLASSES, [0])
    assert good_classes(["good", "defect_p033", "defect_p100"], "good,defect_p033") == [0, 1]
    assert good_classes(["crack", "OK"]) == [1] and good_classes(["a", "b"]) == []
    with pytest.raises(VitfabError, match="not one of the classes"):
        good_classes(["a", "b"], "good")


def test_escape_and_overkill_with_several_good_classes():
    classes = ["good", "minor", "crack"]
    y = np.array([0, 0, 1, 1, 2, 2])
    preds = np.array([1, 2, 0, 2, 0, 2])  # passable: good and minor
    logits = np.eye(3)[preds]
    m = classification_metrics(logits, y, classes, "good,minor")
    assert m["good_class"] == "good,minor"
    assert m["escape_rate"] == pytest.approx(1 / 2)  # one of the two cracks called passable
    assert m["overkill_rate"] == pytest.approx(2 / 4)  # good->crack and minor->crack flagged


def test_balanced_accuracy_and_metric_names():
    y = np.array([0, 0, 0, 0, 1, 1])
    p = np.array([0, 0, 0, 0, 0, 1])
    assert metric_value("top1", y, p, 2) == pytest.approx(5 / 6)
    assert metric_value("balanced_accuracy", y, p, 2) == pytest.approx((1 + 0.5) / 2)
    with pytest.raises(VitfabError, match="--metric"):
        metric_value("accuracy", y, p, 2)


def test_paired_bootstrap_interval():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 300)
    a = np.where(rng.random(300) < 0.9, y, (y + 1) % 3)
    same = paired_bootstrap(y, a, a, 3, "top1")
    assert same["difference"] == same["low"] == same["high"] == 0.0
    b = np.where(rng.random(300) < 0.7, y, (y + 1) % 3)
    d = paired_bootstrap(y, a, b, 3, "top1", n_boot=500)
    assert d["low"] < d["difference"] < d["high"] and d["low"] > 0  # 90 % vs 70 % on 300 images: clear
    assert "shown" in within_verdict(d)
    assert "not within" in within_verdict(paired_bootstrap(y, b, a, 3, "top1", n_boot=500))
    assert "undecided" in within_verdict({"difference": -0.01, "low": -0.04, "high": 0.02})


def test_temperature_scaling_lowers_the_calibration_error_of_an_overconfident_model():
    rng = np.random.default_rng(2)
    z = rng.normal(size=(3000, 4)) * 1.5
    y = np.array([rng.choice(4, p=p) for p in softmax(z)])
    over = 4 * z  # four times too confident
    before, after = calibration(over, y, 1.0), calibration(over, y, fit_temperature(over, y))
    assert after["ece"] < before["ece"] / 2
    assert sum(b["count"] for b in before["bins"]) == 3000
