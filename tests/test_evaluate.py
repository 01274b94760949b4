"""Metrics from a confusion matrix: accuracy, mean loss and macro-F1."""

import numpy as np
import pytest

from fedmpi.evaluate import metrics_from_counts


def test_metrics_from_confusion_matrix():
    # true-major: row = true class, column = predicted class
    confusion = np.array([[3, 1], [2, 4]], dtype=np.float64)
    result = metrics_from_counts(np.concatenate([confusion.ravel(), [5.0]]), 2)
    assert result.accuracy == pytest.approx(0.7)
    assert result.loss == pytest.approx(0.5)
    f1_0, f1_1 = 2 * 3 / (2 * 3 + 1 + 2), 2 * 4 / (2 * 4 + 2 + 1)
    assert result.macro_f1 == pytest.approx((f1_0 + f1_1) / 2)
    assert result.examples == 10


def test_a_class_absent_from_labels_and_predictions_does_not_count():
    confusion = np.array([[5, 0, 0], [0, 5, 0], [0, 0, 0]], dtype=np.float64)
    assert metrics_from_counts(np.concatenate([confusion.ravel(), [0.0]]), 3).macro_f1 == 1.0
