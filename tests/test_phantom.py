"""The anatomy model: labels where the anatomy is, grades visible as the intended signal change, twins alike."""

from __future__ import annotations

import numpy as np
import pytest

from stages.demo import phantom as ph
from stages.demo.synth_dicom import stack

MATRIX, FOV = 128, 300.0


def _traits(seed: int = 1, share: float = 0.0) -> ph.SubjectTraits:
    return ph.sample_traits(np.random.default_rng([seed, 0]), np.random.default_rng([seed, 1]), share, True)


def _state(grades=(2, 2, 2, 2, 2, 2), herniation=(0, 0, 0, 0, 0, 0)) -> ph.StudyState:
    return ph.StudyState(grades=np.array(grades), herniation=np.array(herniation, bool), lordosis_delta_deg=0.0,
                         rotation=ph.rotation(0, 0, 0), position=np.array([0.0, 20.0, -5.0]))


def _mid_sagittal(traits, state):
    geom = stack(np.array([0.0, 0.0, 0.0]), np.array([0.0, 1.0, 0.0]), np.array([0.0, 0.0, -1.0]), 1, 4.0,
                 FOV / MATRIX, MATRIX, 4.0)[0]
    images, label = ph.render(geom.points(), traits, state, (ph.T2,))
    return geom, images["T2"].reshape(MATRIX, MATRIX), label.reshape(MATRIX, MATRIX)


def test_every_level_is_labelled_in_anatomical_order_at_its_centre():
    traits, state = _traits(), _state()
    geom, _, label = _mid_sagittal(traits, state)
    layout = ph.build_layout(traits, state)
    rows = []
    for names, intervals, labels in ((ph.VERTEBRAE, layout.body, ph.VERTEBRA_LABELS),
                                     (ph.DISCS, layout.disc, ph.DISC_LABELS)):
        for i, name in enumerate(names):
            if name not in labels:
                continue
            ii, jj = np.nonzero(label == labels[name])
            assert len(ii) > 5, f"{name} missing from the mid-sagittal label map"
            world, _, _ = ph.structure_centre(layout, state, float(intervals[i].mean()))
            truth = (world - geom.position) @ np.column_stack([geom.row_dir, geom.col_dir]) / geom.spacing
            assert abs(jj.mean() - truth[0]) < 1.0 and abs(ii.mean() - truth[1]) < 1.0, name
            rows.append((ii.mean(), name))
    order = [name for _, name in sorted(rows)]
    expected = ["T12", "T12-L1", "L1", "L1-L2", "L2", "L2-L3", "L3", "L3-L4", "L4", "L4-L5", "L5", "L5-S1", "S1"]
    assert order == expected


def test_no_label_outside_the_spine():
    _, _, label = _mid_sagittal(_traits(), _state())
    assert set(np.unique(label)) == {0, *ph.VERTEBRA_LABELS.values(), *ph.DISC_LABELS.values()}


def _disc_signal_and_height(grade: int) -> tuple[float, float]:
    _, image, label = _mid_sagittal(_traits(3), _state(grades=[grade] * 6))
    mask = label == ph.DISC_LABELS["L3-L4"]
    ii, jj = np.nonzero(mask)
    core = (np.abs(ii - ii.mean()) <= 1) & (np.abs(jj - jj.mean()) <= 3)
    return float(image[ii[core], jj[core]].mean()), float(np.ptp(ii) + 1)


def test_pfirrmann_grade_shows_as_loss_of_nucleus_signal_and_height():
    signal, height = zip(*(_disc_signal_and_height(g) for g in range(1, 6)))
    assert all(a > b for a, b in zip(signal, signal[1:])), signal
    assert signal[0] > 0.8 and signal[4] < 0.3
    assert height[0] >= height[2] > height[4], height


def test_herniation_is_disc_tissue_bulging_behind_the_disc():
    traits = _traits(4)
    _, _, plain = _mid_sagittal(traits, _state())
    _, _, hernia = _mid_sagittal(traits, _state(herniation=[0, 0, 0, 0, 1, 0]))
    disc = ph.DISC_LABELS["L4-L5"]
    added = (hernia == disc) & (plain != disc)
    assert added.sum() >= 3
    # Posterior is increasing column (row direction +y); the bulge lies behind the disc's own posterior edge.
    assert np.nonzero(added)[1].min() > np.nonzero(plain == disc)[1].mean()


def test_twins_share_traits_more_than_strangers():
    def heights(family: int, own: int, share: float) -> np.ndarray:
        return ph.sample_traits(np.random.default_rng([family]), np.random.default_rng([10_000 + own]), share,
                                True).body_height

    twin = [np.abs(heights(f, 2 * f, 0.5) - heights(f, 2 * f + 1, 0.5)).mean() for f in range(60)]
    strangers = [np.abs(heights(f, 2 * f, 0.5) - heights(f + 1000, 2 * f + 1, 0.5)).mean() for f in range(60)]
    assert np.mean(twin) < 0.85 * np.mean(strangers)


def test_same_subject_same_anatomy_and_texture():
    a, b = _traits(9), _traits(9)
    assert np.array_equal(a.body_height, b.body_height)
    x = np.random.default_rng(0).normal(size=(50, 3)) * 10
    assert np.array_equal(a.marrow(3, x), b.marrow(3, x))
    assert not np.array_equal(a.marrow(3, x), _traits(10).marrow(3, x))


def test_share_out_of_range_is_rejected():
    with pytest.raises(ValueError, match="share must be in"):
        ph.sample_traits(np.random.default_rng(0), np.random.default_rng(1), 1.5, True)
