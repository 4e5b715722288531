"""NIL threshold calibration on hand-made dev mentions whose curve is worked out by hand."""

from __future__ import annotations

import json

import numpy as np
import pytest

from mmel.core.errors import DataError
from mmel.retrieval.nil import NilCalibration, calibrate_nil, choose_simulated_nil, nil_curve, nil_statistic

# Five dev mentions, best first: two correct links, one wrong link, two NIL mentions.
SCORES = np.array([0.9, 0.8, 0.7, 0.6, 0.3])
CORRECT = np.array([True, True, False, False, False])
IS_NIL = np.array([False, False, False, True, True])


def test_curve_matches_the_hand_computed_operating_points():
    curve = nil_curve(SCORES, CORRECT, IS_NIL)
    assert [point.threshold for point in curve] == pytest.approx([0.3, 0.45, 0.65, 0.75, 0.85, 0.9])
    assert [point.answered for point in curve] == [5, 4, 3, 2, 1, 0]
    assert [point.correct_links for point in curve] == [2, 2, 2, 2, 1, 0]
    assert [point.abstained_nil for point in curve] == [0, 1, 2, 2, 2, 2]
    answer_all, _, after_nils, precise, _, answer_none = curve
    assert answer_all.accuracy == pytest.approx(2 / 5) and answer_all.nil_recall == 0.0
    assert answer_all.nil_precision == 1.0  # nothing abstained: nothing wrong
    assert after_nils.accuracy == pytest.approx(4 / 5) and after_nils.link_precision == pytest.approx(2 / 3)
    assert precise.link_precision == 1.0 and precise.link_recall == pytest.approx(2 / 3)
    assert precise.nil_precision == pytest.approx(2 / 3) and precise.nil_recall == 1.0
    assert answer_none.link_recall == 0.0 and answer_none.link_f1 == 0.0 and answer_none.accuracy == pytest.approx(0.4)


def test_accuracy_criterion_takes_the_lowest_best_threshold():
    calibration = calibrate_nil(SCORES, CORRECT, IS_NIL)
    assert calibration.threshold == pytest.approx(0.65)  # ties with 0.75 at accuracy 4/5; lower answers more
    assert calibration.is_nil(0.64) and not calibration.is_nil(0.7)
    np.testing.assert_array_equal(calibration.is_nil(SCORES), [False, False, False, True, True])
    assert (calibration.num_mentions, calibration.num_linkable, calibration.num_nil) == (5, 3, 2)


def test_precision_criterion_takes_the_best_recall_at_the_target():
    calibration = calibrate_nil(SCORES, CORRECT, IS_NIL, criterion="precision", target_precision=0.9)
    assert calibration.threshold == pytest.approx(0.75)
    assert calibration.chosen.link_precision == 1.0 and calibration.chosen.link_recall == pytest.approx(2 / 3)


def test_without_nil_mentions_accuracy_answers_everything():
    calibration = calibrate_nil(SCORES, CORRECT, np.zeros(5, dtype=bool))
    assert calibration.threshold == pytest.approx(0.3) and calibration.chosen.answered == 5


def test_unreachable_precision_and_bad_inputs_raise():
    with pytest.raises(ValueError, match=r"no threshold reaches link precision 1 .*best: 0.000"):
        calibrate_nil(SCORES, np.zeros(5, dtype=bool), IS_NIL, criterion="precision", target_precision=1.0)
    with pytest.raises(ValueError, match=r"mentions \[3\] are NIL yet have a correct top-1"):
        calibrate_nil(SCORES, np.array([True, True, False, True, False]), IS_NIL)
    with pytest.raises(ValueError, match="available: accuracy, precision"):
        calibrate_nil(SCORES, CORRECT, IS_NIL, criterion="f2")
    with pytest.raises(ValueError, match="target_precision is required"):
        calibrate_nil(SCORES, CORRECT, IS_NIL, criterion="precision")
    with pytest.raises(ValueError, match="1-D of one length"):
        calibrate_nil(SCORES[:4], CORRECT, IS_NIL)
    with pytest.raises(ValueError, match="NaN or inf"):
        calibrate_nil(np.array([0.1, np.nan, 0.2, 0.3, 0.4]), CORRECT, IS_NIL)


def test_save_load_round_trip(tmp_path):
    calibration = calibrate_nil(SCORES, CORRECT, IS_NIL, metadata={"model": "mimic", "nil_fraction": 0.4})
    loaded = NilCalibration.load(calibration.save(tmp_path / "nil.json"))
    assert loaded == calibration


def test_version_1_files_read_as_top1_score_thresholds(tmp_path):
    values = calibrate_nil(SCORES, CORRECT, IS_NIL).to_dict()
    del values["statistic"]
    values["format_version"] = 1
    path = tmp_path / "nil.json"
    path.write_text(json.dumps(values))
    assert NilCalibration.load(path).statistic == "score"


def test_statistics_of_a_ranking():
    assert nil_statistic([3.0, 2.5, 1.0], "score") == 3.0
    assert nil_statistic([3.0, 2.5, 1.0], "margin") == pytest.approx(0.5)
    assert nil_statistic([3.0], "margin") == float("inf") and nil_statistic([], "score") == float("-inf")
    with pytest.raises(ValueError, match="unknown NIL statistic"):
        nil_statistic([1.0], "entropy")


def test_margin_calibration_decides_on_the_gap_to_the_runner_up():
    calibration = calibrate_nil(np.array([0.1, 0.05, 2.0, 1.5]), np.array([False, False, True, True]),
                                np.array([True, True, False, False]), statistic="margin")
    assert calibration.statistic == "margin" and calibration.chosen.accuracy == 1.0
    assert calibration.is_nil_ranking([9.0, 8.95])           # a high score that barely beats a rival
    assert not calibration.is_nil_ranking([1.0, -1.0])       # a lower score far ahead of the rest
    assert "top-1 margin" in calibration.to_markdown()


def test_load_rejects_other_json(tmp_path):
    path = tmp_path / "other.json"
    path.write_text('{"format": "something-else"}')
    with pytest.raises(DataError, match="not an mmel NIL calibration"):
        NilCalibration.load(path)


def test_markdown_lists_the_operating_points():
    markdown = calibrate_nil(SCORES, CORRECT, IS_NIL).to_markdown()
    assert "5 dev mentions: 3 linkable, 2 NIL" in markdown
    assert "| answer all (no NIL) | 0.3 | 5 | 0.400 | 0.667 |" in markdown
    assert "| chosen (accuracy) | 0.65 | 3 |" in markdown
    assert "| link precision >= 0.99 | 0.75 | 2 | 1.000 |" in markdown


def test_plot_writes_a_png(tmp_path):
    path = calibrate_nil(SCORES, CORRECT, IS_NIL).plot(tmp_path / "nil.png")
    assert path.read_bytes().startswith(b"\x89PNG")


def test_simulated_nil_mask_is_seeded_and_sized():
    mask = choose_simulated_nil(100, 0.2, seed=3)
    assert mask.dtype == bool and mask.sum() == 20
    np.testing.assert_array_equal(mask, choose_simulated_nil(100, 0.2, seed=3))
    assert not np.array_equal(mask, choose_simulated_nil(100, 0.2, seed=4))
    with pytest.raises(ValueError, match="between 0 and 1"):
        choose_simulated_nil(10, 1.0)
