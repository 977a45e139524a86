"""The built-in localiser: its domain-randomised training slices, its shipped weights on real MR slices, a single 2D
slice as input, the recipe's reproducibility, and which weights a cohort uses (``localise.model``).

The real slices are 51 mid-sagittal lumbar MR slices of 31 patients from SPIDER: van der Graaf J.W., van Hooff
M.L., Buckens C.F.M. et al., *Lumbar spine segmentation in MR images: a dataset and a public benchmark*, Scientific
Data 11, 264 (2024), CC BY 4.0, in ``shared/real_spider_sagittal`` beside the repository (tests skip without them).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
import torch
import yaml
from conftest import ROOT
from PIL import Image
from test_workflow import TINY, snakemake

from stages.anatomy.localiser import (
    BUILTIN,
    BUILTIN_CARD,
    LocaliseConfig,
    _chain_from_anchor,
    load_localiser,
    localise_image,
    slice_image,
)
from stages.core import levels
from stages.demo import phantom as ph
from stages.demo import randomised as rd
from stages.localise import Folders, localise_scan
from stages.localiser_builtin import Recipe, training_set
from stages.localiser_slices import local_spacing, run as score_slices, score_image
from stages.localiser_train import starting_point

SPIDER = ROOT.parent / "shared" / "real_spider_sagittal"
needs_spider = pytest.mark.skipif(not (SPIDER / "discs.csv").is_file(), reason=f"no SPIDER slices in {SPIDER}")


def test_training_centres_are_where_the_phantom_draws_the_structures():
    """Each target centre lies at the centroid of its structure's labelled pixels in the rendered slice."""
    for seed in range(3):
        rng = np.random.default_rng(seed)
        traits, state = rd.random_scene(rng)
        layout = ph.build_layout(traits, state)
        plane = rd.random_plane(rng, layout, state, 96, rd.Randomisation(lateral_mm=0.0))
        _, label = ph.render(plane.points(0.0), traits, state, (ph.T2,))
        label = label.reshape(96, 96)
        checked = 0
        for kind, name, row, col in rd.centres(layout, state, plane):
            value = (levels.VERTEBRA_LABELS if kind == "vertebra" else levels.DISC_LABELS).get(name)
            rows, cols = np.nonzero(label == value) if value else ((), ())
            if len(rows) < 20 or rows.min() == 0 or rows.max() == 95 or cols.min() == 0 or cols.max() == 95:
                continue  # unlabelled (T11) or cut by the field of view
            assert abs(rows.mean() - row) < 1.0 and abs(cols.mean() - col) < 1.5, (seed, name)
            checked += 1
        assert checked >= 8


def test_randomised_stacks_are_seeded_and_single_slices_repeat():
    a = rd.render_stacks(np.random.default_rng(5), 48, 2)
    b = rd.render_stacks(np.random.default_rng(5), 48, 2)
    assert all(np.array_equal(x, y) for x, y in zip(a[0], b[0])) and a[1] == b[1]
    assert len(a[0]) == 2 and a[0][0].shape == (3, 48, 48) and not np.array_equal(a[0][0], a[0][1])
    single = rd.render_stacks(np.random.default_rng(1), 32, 1, rd.Randomisation(single_slice_share=1.0))[0][0]
    assert np.array_equal(single[0], single[1]) and np.array_equal(single[1], single[2])
    multi = rd.render_stacks(np.random.default_rng(1), 32, 1, rd.Randomisation(single_slice_share=0.0))[0][0]
    assert not np.array_equal(multi[0], multi[2])


def test_the_recipe_gives_the_same_training_set_with_any_number_of_workers():
    recipe = Recipe(scenes=3, contrasts=1, image_size=32)
    one, two = training_set(recipe, 1), training_set(recipe, 2)
    assert len(one) == 3 and all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(one, two))
    target = one[0][1][0]
    assert target.shape == (3, 32, 32) and float(target.amax(dim=(1, 2)).min()) > 0.5  # a peak at each centre
    assert float((target[2] > 0.5).sum()) < float((target[1] > 0.5).sum())  # one disc of them: L5-S1


def test_the_shipped_weights_load_with_their_card():
    model, cfg = load_localiser(BUILTIN)
    card = json.loads(BUILTIN_CARD.read_text())
    assert model is not None and cfg.model == "builtin"
    assert cfg.width == card["recipe"]["width"] and cfg.image_size == card["recipe"]["image_size"]
    assert sum(p.numel() for p in model.parameters()) == card["parameters"]


def test_levels_are_counted_up_the_chain_from_the_lumbosacral_disc():
    """S1 and L5 around the L5-S1 peak, then each body where the last step predicts it: the sacral segments below and
    a posterior element beside the chain are not levels."""
    z = [210.0, 175.0, 140.0, 105.0, 70.0, 35.0, 0.0]  # T12 .. S1, 35 mm apart
    bodies = np.array([[0.0, 0.0, v] for v in z] + [[0.0, 8.0, -30.0], [0.0, 20.0, -55.0], [0.0, 45.0, 52.0]])
    shuffled = np.random.default_rng(0).permutation(len(bodies))
    chain = _chain_from_anchor(bodies[shuffled], np.array([0.0, 0.0, 17.5]))
    assert [int(shuffled[i]) for i in chain] == [6, 5, 4, 3, 2, 1, 0]  # S1, L5, ..., T12
    # an anchor at L4-L5 makes L5 the S1: the anchor decides the levels
    assert _chain_from_anchor(bodies, np.array([0.0, 0.0, 52.5])) == [5, 4, 3, 2, 1, 0]
    assert _chain_from_anchor(bodies, np.array([0.0, 0.0, 300.0])) is None  # nothing below it


def test_disc_scoring_by_hand():
    truth = pd.DataFrame({"image": "a", "level": ["T11-T12", "T12-L1", "L1-L2", "L2-L3"],
                          "x": [50.0, 50.0, 52.0, 54.0], "y": [10.0, 40.0, 70.0, 100.0]})
    # neighbours 30, hypot(2, 30) = 30.067 and 30.067 apart: each disc's mean over its neighbours
    assert local_spacing(truth).round(3).tolist() == [30.0, 30.033, 30.067, 30.067]
    predicted = pd.DataFrame({"level": ["T12-L1", "L2-L3"], "i": [50.0, 52.0], "j": [46.0, 72.0]})
    scored = score_image(truth, predicted).set_index("level")
    assert list(scored.index) == ["T12-L1", "L1-L2", "L2-L3"]  # T11-T12 is no level of the workflow's
    assert scored.loc["T12-L1", "found"] and scored.loc["T12-L1", "level_correct"]
    assert scored.loc["T12-L1", "relative_error"] == pytest.approx(6 / 30.0333, rel=1e-4)
    assert scored.loc["L1-L2", "found"] and not scored.loc["L1-L2", "level_correct"]  # nearest says L2-L3
    assert not scored.loc["L2-L3", "found"]  # 28.1 px from the nearest prediction, over half its spacing


@needs_spider
def test_the_builtin_localiser_finds_and_labels_discs_on_real_slices():
    """The figures the README's model card reports (make localiser-weights), with a margin below them."""
    scored, summary = score_slices(SPIDER / "discs.csv", SPIDER / "images", BUILTIN, 300.0)
    assert summary["images"] == 51 and summary["discs"] == len(scored) > 290
    assert summary["found"] >= 0.75  # measured 0.818
    assert summary["level_accuracy_of_found"] >= 0.65  # 0.710
    assert summary["median_relative_error"] <= 0.10  # 0.052


@needs_spider
def test_a_single_slice_volume_is_localised(tmp_path):
    """One 2D image as a one-slice volume (as ingest writes a one-slice series) goes through the localise stage."""
    name = sorted((SPIDER / "images").glob("*_t2.png"))[0]
    pixels = np.asarray(Image.open(name).convert("F"), dtype=np.float32)
    image = sitk.GetImageFromArray(pixels[None])
    image.SetSpacing((300 / pixels.shape[0],) * 2 + (4.0,))
    image.SetDirection((0, 0, -1, 1, 0, 0, 0, -1, 0))  # rows head to feet, columns anterior to posterior
    (tmp_path / "volumes").mkdir()
    sitk.WriteImage(image, str(tmp_path / "volumes" / "s.nii.gz"))
    scan = {"scan_id": "s", "label_map": "", "volume": "volumes/s.nii.gz"}
    result = localise_scan((Folders(tmp_path / "volumes", tmp_path), scan, False, BUILTIN, None))
    table = result["structures"]
    assert result["source"] == "learned" and len(table) >= 5 and (table.k == 0).all()
    assert set(table.level[table.kind == "vertebra"]) <= set(levels.VERTEBRAE)
    model, cfg = load_localiser(BUILTIN)
    direct, _ = localise_image(model, cfg, slice_image(pixels, 300 / pixels.shape[0]))
    pd.testing.assert_frame_equal(table[["kind", "level", "i", "j"]], direct[["kind", "level", "i", "j"]])


def test_cohort_training_can_start_from_the_builtin_weights():
    start, cfg = starting_point(LocaliseConfig.from_config({"model": "cohort", "start_from_builtin": True,
                                                            "width": 4, "image_size": 64}))
    model, builtin = load_localiser(BUILTIN)
    assert (cfg.width, cfg.image_size) == (builtin.width, builtin.image_size)
    assert all(torch.equal(a, b) for a, b in zip(start.state_dict().values(), model.state_dict().values()))
    assert starting_point(LocaliseConfig.from_config({"model": "cohort"}))[0] is None


@pytest.mark.slow
def test_the_workflow_uses_the_weights_localise_model_names(tmp_path):
    config = yaml.safe_load(TINY.read_text())
    plans = {}
    for choice in ("builtin", "cohort", str(BUILTIN), str(tmp_path / "missing.pt")):
        config["localise"]["model"] = choice
        path = tmp_path / "config.yaml"
        path.write_text(yaml.safe_dump(config))
        plans[choice] = snakemake(tmp_path, "localise", "-n", "-p", "--configfile", str(path))
    # (localise's jobs come after ingest's checkpoint, so a dry run lists them but not their commands)
    for choice in ("builtin", str(BUILTIN)):
        assert plans[choice].returncode == 0, plans[choice].stderr[-2000:]
        assert "localiser_train" not in plans[choice].stdout
    assert plans["cohort"].returncode == 0  # (the cohort's own training runs in test_workflow.py's tiny run)
    failed = plans[str(tmp_path / "missing.pt")]
    assert failed.returncode != 0 and "localise.model" in failed.stdout + failed.stderr
