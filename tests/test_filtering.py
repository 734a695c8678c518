"""cGAN-KD's M2 as a pure function: per-class and global cut-offs, filtering, relabelling and the report's
numbers, on hand-made tensors (no generator, no teacher network, no store)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kd_lightning.sampling.filtering import classification_errors, filter_and_relabel

#: 8 samples of 2 classes; sample 3 was rejected by cDR-RS (its low error must not keep it)
LABELS = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
ACCEPTED = torch.tensor([True, True, True, False, True, True, True, True])
ERRORS = torch.tensor([0.1, 0.5, 0.9, 0.05, 0.2, 0.4, 0.6, 0.8])
#: the teacher's argmax: [0, 1, 0, 0, 1, 0, 1, 1]
LOGITS = 3.0 * torch.nn.functional.one_hot(torch.tensor([0, 1, 0, 0, 1, 0, 1, 1]), 2).float()


def test_per_class_quantile_keeps_the_samples_at_or_below_their_class_cutoff() -> None:
    m2 = filter_and_relabel(LABELS, ACCEPTED, LOGITS, ERRORS, task="classification", rho=0.5)
    # class 0: median of the accepted 0.1, 0.5, 0.9; class 1: linear quantile of 0.2, 0.4, 0.6, 0.8
    assert m2.cutoffs == pytest.approx({0: 0.5, 1: 0.5})
    assert m2.kept.tolist() == [True, True, False, False, True, True, False, False]
    assert not m2.replaced.any() and m2.final_label.tolist() == LABELS.tolist()
    rep = m2.report
    assert list(rep) == [
        "cutoffs",
        "label_consistency_before",
        "label_consistency_after",
        "drop_rate_per_class",
        "n_accepted",
        "n_kept",
    ]
    assert rep["cutoffs"] == pytest.approx({"0": 0.5, "1": 0.5})
    assert (rep["n_accepted"], rep["n_kept"]) == (7, 4)
    assert rep["drop_rate_per_class"] == pytest.approx({"0": 1 / 3, "1": 0.5})
    # the teacher agrees with the label on 5 of the 7 accepted samples and on 2 of the 4 kept
    assert rep["label_consistency_before"] == pytest.approx(5 / 7)
    assert rep["label_consistency_after"] == pytest.approx(0.5)


def test_relabel_gives_kept_samples_the_teachers_argmax() -> None:
    m2 = filter_and_relabel(LABELS, ACCEPTED, LOGITS, ERRORS, task="classification", rho=0.5, replace=True)
    assert m2.replaced.tolist() == m2.kept.tolist()
    assert m2.final_label.tolist() == [0, 1, 0, 0, 1, 0, 1, 1]  # kept 1 and 5 change class; the rest keep theirs
    # without filtering every accepted sample is relabelled (the rejected one is not), and the cut-offs are reported
    m2 = filter_and_relabel(
        LABELS, ACCEPTED, LOGITS, ERRORS, task="classification", rho=0.5, filter=False, replace=True
    )
    assert m2.kept.tolist() == ACCEPTED.tolist() and m2.replaced.tolist() == ACCEPTED.tolist()
    assert m2.final_label.tolist() == [0, 1, 0, 0, 1, 0, 1, 1]
    assert "cutoffs" in m2.report and m2.report["n_kept"] == 7


def test_errors_default_to_the_cross_entropy_of_the_teachers_logits() -> None:
    g = torch.Generator().manual_seed(0)
    logits, labels = torch.randn(40, 4, generator=g), torch.randint(0, 4, (40,), generator=g)
    accepted = torch.rand(40, generator=g) < 0.8
    m2 = filter_and_relabel(labels, accepted, logits, task="classification", rho=0.7)
    ce = -torch.log_softmax(logits, 1)[torch.arange(40), labels].numpy().astype(np.float64)
    acc = accepted.numpy()
    for c, cut in m2.cutoffs.items():  # type: ignore[union-attr]
        assert cut == pytest.approx(float(np.quantile(ce[acc & (labels.numpy() == c)], 0.7)), rel=1e-6)
    given = filter_and_relabel(labels, accepted, logits, classification_errors(logits, labels), rho=0.7)
    assert given.kept.tolist() == m2.kept.tolist() and given.report == m2.report


def test_regression_cuts_globally_replaces_with_clipped_predictions_and_reports_mae_in_label_units() -> None:
    labels = np.array([0.1, 0.2, 0.3, 0.4, 0.96])
    preds = np.array([[0.15], [0.5], [0.3], [1.3], [1.01]])
    errors = np.array([0.05, 0.3, 0.0, 0.9, 0.05])
    accepted = np.ones(5, dtype=bool)
    m2 = filter_and_relabel(labels, accepted, preds, errors, task="regression", rho=0.6, replace=True, label_scale=90.0)
    assert m2.cutoffs == pytest.approx(0.15)  # sorted 0, .05, .05, .3, .9: position 2.4 -> .05 + .4 * .25
    assert m2.kept.tolist() == [True, False, True, False, True]
    assert m2.final_label == pytest.approx([0.15, 0.2, 0.3, 0.4, 1.0])  # the teacher's 1.01 clipped to 1
    assert list(m2.report) == ["cutoff", "teacher_mae_before", "teacher_mae_after", "n_accepted", "n_kept"]
    assert m2.report["teacher_mae_before"] == pytest.approx(90 * np.abs(preds[:, 0] - labels).mean())
    assert m2.report["teacher_mae_after"] == pytest.approx(90 * np.abs(preds[:, 0] - labels)[[0, 2, 4]].mean())
    assert (m2.report["n_accepted"], m2.report["n_kept"]) == (5, 3)


def test_without_a_teacher_every_accepted_sample_is_kept_as_it_is() -> None:
    m2 = filter_and_relabel(LABELS, ACCEPTED, task="classification", rho=0.5, filter=False)
    assert m2.cutoffs is None and m2.kept.tolist() == ACCEPTED.tolist()
    assert not m2.replaced.any() and m2.final_label.tolist() == LABELS.tolist()
    assert m2.report == {"drop_rate_per_class": {"0": 0.0, "1": 0.0}, "n_accepted": 7, "n_kept": 7}
