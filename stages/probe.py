"""Stage probe: one (model, task, label subset, seed) of the downstream comparison, trained and scored on the test part.

Models (Jamaludin et al. 2017, section 4.2; Hou et al. 2023):

- frozen (a pretrained encoder, the random encoder, the supervised-transfer encoder): the encoder's features, read
  from the features stage (``--features``), feed two heads trained on the label subset: ``linear`` (logistic
  regression on standardised features, class-balanced, its L2 strength chosen from ``linear_c`` by cross-validation
  grouped by subject) and ``mlp`` (one hidden layer, class-balanced, fixed epochs);
- end to end (``--end-to-end``): the same network (stages/nets/disc_net.py) trained on the label subset, from random
  weights (``scratch``) or from a pretrained encoder (``--encoder``: fine-tuning), with early stopping on the
  downstream validation part.
- the axial slices (``--axial`` with a simclr ``--encoder``; Hou et al. 2023): frozen, their ``slices`` head, one FC
  layer on the three slices' extractor features trained with Adam on crops shared by the slices, once per
  (dropout, weight decay) of the ``slice_head`` section (stages/training/slice_head.py), beside the linear and MLP
  heads on ``--disc-pooled``; end to end, the extractor and that layer trained together (their supervised baseline).
  ``--initial-weights``: the encoder's architecture at pretraining's initial weights (the ``METHOD-random`` and
  ``METHOD-scratch`` baselines).

Training samples are the labelled samples of the subset's subjects (all their scans); the test samples are those of
the downstream test subjects. Before anything is trained the stage checks that every training subject is a downstream
training subject of the subset (:class:`stages.evaluation.probe_data.LeakageError` otherwise).

Run (the workflow names each file; a job's files sit in results/probes/runs/{model}/{task}/f{fraction}/seed{seed}/):
    python -m stages.probe --model siamese --task grade --fraction 0.358 --subset-seed 0 \\
        --subjects results/splits/subjects.parquet --volumes results/splits/volumes.parquet \\
        --features results/probes/features/siamese/features.npy --metrics job/metrics.json \\
        --predictions job/predictions.parquet --model-file job/model.npz --history job/history.csv

Writes ``--metrics`` (JSON, one entry per head: the metrics, the confusion matrix, the training set's size),
``--predictions`` (Parquet, per test sample and head: subject, scan, level, truth, prediction, class probabilities),
``--model-file`` (npz: the fitted heads, or end to end the trained network, for Grad-CAM; nothing but ``classes`` when
the subset had one class) and ``--history`` (CSV, end to end: the loss per epoch; no rows for a frozen probe or a
one-class subset, which train no network).
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from stages.core import cli, seeds
from stages.core.levels import VERTEBRAE
from stages.evaluation.metrics import average_class_accuracy, binary_metrics, confusion
from stages.evaluation.probe_data import (
    TASKS,
    LeakageError,
    ProbeConfig,
    SliceHeadConfig,
    Task,
    check_training_subjects,
    grade_mapping,
    label_subset,
    task_samples,
)
from stages.nets.heads import Head, Standardiser, fit_head, grouped_folds

log = logging.getLogger("probe")


HISTORY_COLUMNS = ["epoch", "train_loss", "val_loss"]
END_TO_END_HEAD = "network"   # the head column of a model trained end to end


@dataclass(frozen=True)
class JobFiles:
    """The files one probe job writes (the probe rule's outputs)."""

    metrics: Path
    predictions: Path
    model: Path
    history: Path

    @classmethod
    def in_folder(cls, folder: Path) -> JobFiles:
        """The workflow's file names in one folder (for tests and scripts; the rules name each file)."""
        return cls(folder / "metrics.json", folder / "predictions.parquet", folder / "model.npz",
                   folder / "history.csv")


def classes_of(task: Task, grade_classes: tuple[int, ...] = (1, 2, 3, 4, 5)) -> np.ndarray:
    """Every class the task can have (grade classes 1..K, herniation 0/1, level 0-6), in order."""
    return {"grade": np.arange(1, max(grade_classes) + 1), "herniation": np.array([0, 1]),
            "level": np.arange(len(VERTEBRAE))}[task.name]


def feature_matrix(samples: pd.DataFrame, features: np.ndarray) -> np.ndarray:
    """A sample's features: its body's, or the body above's and the body below's concatenated (a disc)."""
    upper = np.asarray(features[samples.upper.to_numpy()], dtype=np.float32)
    if (samples.lower < 0).all():
        return upper
    return np.concatenate([upper, np.asarray(features[samples.lower.to_numpy()], dtype=np.float32)], axis=1)


def fit_linear(x: np.ndarray, y: np.ndarray, groups: np.ndarray, n_classes: int, cfg: ProbeConfig, binary: bool,
               seed: int) -> tuple[Head, dict[str, Any]]:
    """Class-balanced logistic regression; C from ``linear_c`` by cross-validation grouped by subject, scored by the
    task's headline metric (ROC AUC for a binary task, average class accuracy otherwise)."""
    folds = grouped_folds(groups, min(cfg.cv_folds, len(np.unique(groups))), seed)
    scores: dict[float, float] = {}
    grid = sorted(cfg.linear_c)   # strongest penalty first: each fit starts from the previous one
    if len(grid) > 1 and len(folds) >= 2:
        values: dict[float, list[float]] = {c: [] for c in grid}
        for held in folds:
            train = np.setdiff1d(np.arange(len(y)), held)
            if len(np.unique(y[train])) < 2:
                continue
            std, start = Standardiser.fit(x[train]), None
            for c in grid:
                head = fit_head(x[train], y[train], n_classes, 1 / c, max_iter=cfg.max_iter, standardiser=std,
                                start=start)
                start, proba = head.theta, head.predict_proba(x[held])
                values[c].append(binary_metrics(y[held], proba[:, 1])["auc"] if binary
                                 else average_class_accuracy(y[held], proba.argmax(1)))
        for c in grid:
            finite = [v for v in values[c] if np.isfinite(v)]
            scores[c] = float(np.mean(finite)) if finite else float("nan")
        best = max(grid, key=lambda c: (np.nan_to_num(scores[c], nan=-1.0), -c))   # ties: the stronger penalty
    else:
        best = sorted(cfg.linear_c)[len(cfg.linear_c) // 2]
    head = fit_head(x, y, n_classes, 1 / best, max_iter=cfg.max_iter)
    return head, {"C": best, "cv_scores": {str(c): (v if np.isfinite(v) else None) for c, v in scores.items()},
                  "converged": head.converged}


def score(task: Task, truth: np.ndarray, proba: np.ndarray, classes: np.ndarray) -> dict[str, Any]:
    """The task's metrics from class probabilities (a prediction is the most probable class)."""
    predicted = classes[proba.argmax(1)]
    metrics: dict[str, Any] = {"accuracy": float((predicted == truth).mean()),
                               "average_class_accuracy": average_class_accuracy(truth, predicted)}
    if task.binary:
        metrics.update(binary_metrics(truth, proba[:, 1]))
    metrics["confusion"] = {"labels": classes.tolist(), "counts": confusion(truth, predicted, classes).tolist()}
    metrics["classes_in_test"] = np.unique(truth).tolist()
    return metrics


@dataclass(frozen=True)
class JobInputs:
    """What a probe job reads besides the splits' tables (which ones depends on the model and the disc input)."""

    features: Path | None = None      # frozen, bodies: features.npy of the features stage (FC7 of every body)
    disc_maps: Path | None = None     # frozen, disc: disc_maps.npy of the disc_features stage (FC6's input per view)
    disc_pooled: Path | None = None   # frozen, disc: disc_pooled.npy (pooled Conv5 features)
    disc_trunk: Path | None = None    # frozen, disc: disc_trunk.npz (the classifier's spec and Conv1-Conv5)
    vertebrae: Path | None = None     # end to end, bodies: vertebrae.npy
    discs: Path | None = None         # end to end, disc: discs.npy
    encoder: Path | None = None       # end to end: start from this encoder.pt (fine-tuning); slices: the extractor
    axial: Path | None = None         # axial methods: the three axial slices of each disc (slices head, end to end)
    axial_second: Path | None = None  # their second sample (slices 2-4 of a 4-slice disc; zeros for other discs)
    initial_weights: bool = False     # the encoder's architecture at pretraining's initial weights (``encoder_seed``)
    encoder_seed: int = 0


def run(model: str, task_name: str, fraction: float, subset_seed: int, subjects_file: Path, volumes_file: Path,
        out: JobFiles, cfg: ProbeConfig, features: Path | None = None, vertebrae: Path | None = None,
        encoder: Path | None = None, end_to_end: bool = False, width: float = 1.0, embedding_dim: int = 1024,
        disc_input: str = "bodies", inputs: JobInputs | None = None,
        grade_classes: tuple[int, ...] = (1, 2, 3, 4, 5), slice_cfg: SliceHeadConfig | None = None) -> dict[str, Any]:
    """One probe job on the splits' ``subjects_file`` and ``volumes_file``; writes ``out``.

    A disc task reads the disc volume (``disc_input`` "disc": ``inputs`` names the disc features of a frozen encoder,
    or discs.npy end to end) or the two bodies around the disc ("bodies": ``features`` of a frozen encoder, or
    ``vertebrae`` end to end); the level task always reads bodies. ``encoder``: end to end, start from it."""
    if disc_input not in ("disc", "bodies"):
        raise ValueError(f"disc_input must be 'disc' or 'bodies', got {disc_input!r}")
    inputs = inputs or JobInputs(features=features, vertebrae=vertebrae, encoder=encoder)
    task = TASKS[task_name]
    on_disc = task.kind == "disc" and disc_input == "disc"
    started = time.perf_counter()
    subjects = pd.read_parquet(subjects_file)
    volumes = pd.read_parquet(volumes_file)
    history = pd.DataFrame(columns=HISTORY_COLUMNS)
    samples, counts = task_samples(volumes, task, disc_input)
    classes = classes_of(task, grade_classes)
    if task.name == "grade":
        mapping = grade_mapping(grade_classes)
        unknown = sorted(set(samples.label) - set(mapping))
        if unknown:
            raise ValueError(f"Pfirrmann grades out of range: {unknown} (expected 1-5)")
        samples = samples.assign(label=samples.label.map(mapping).astype(int))
    members = set(label_subset(subjects, fraction, subset_seed, cfg.seed))
    train = samples[samples.subject_id.isin(members)].reset_index(drop=True)
    test = samples[samples.downstream_part == "test"].reset_index(drop=True)
    val = samples[samples.downstream_part == "val"].reset_index(drop=True)
    check_training_subjects(members, subjects, ("train",))
    crossed = train[train.downstream_part != "train"]
    if len(crossed) or set(train.subject_id) & set(test.subject_id):
        raise LeakageError(f"the training subset reaches {crossed.subject_id.nunique()} subject(s) whose volumes are "
                           "in another downstream part (splits/subjects and splits/volumes disagree: re-run the "
                           "splits stage); refusing to train")
    if train.empty:
        raise ValueError(f"label subset {fraction} (seed {subset_seed}) has no {task.name} samples: "
                         f"{len(members)} subject(s) of {counts['samples']} labelled samples")
    if test.empty:
        raise ValueError(f"the downstream test part has no {task.name} samples (see results/splits/summary.json)")
    unknown = sorted(set(samples.label) - set(classes.tolist()))
    if unknown:
        raise ValueError(f"{task.name} labels out of range: {unknown} (expected {classes.tolist()})")
    seed = seeds.probe_job(cfg.seed, subset_seed)
    facts = {"model": model, "task": task.name, "fraction": fraction, "seed": subset_seed,
             "input": "disc volume" if on_disc else ("two bodies" if task.kind == "disc" else "body"),
             "n_subjects": len(members), "n_train_subjects_with_samples": int(train.subject_id.nunique()),
             "n_scans": int(train.scan_id.nunique()), "n_train": len(train), "n_val": len(val), "n_test": len(test),
             "n_test_subjects": int(test.subject_id.nunique()), "classes_in_train": sorted(set(train.label.tolist())),
             "samples": counts}
    # the transfer head trains FC6-FC8 on a 3D trunk's cached maps; an encoder without one (simclr's axial slices,
    # stages/axial_features.py: pooled features only) has its linear and MLP heads
    no_trunk = on_disc and inputs.disc_pooled is not None and inputs.disc_maps is None and inputs.disc_trunk is None
    slice_cfg = slice_cfg or SliceHeadConfig.from_config()
    on_slices = "slices" in cfg.heads and inputs.axial is not None and task.kind == "disc"
    slice_heads = slice_cfg.settings() if on_slices else []
    frozen_heads = [h for h in cfg.heads if h != "slices" and ((on_disc and not no_trunk) or h != "transfer")]
    if not frozen_heads and not slice_heads:
        frozen_heads = ["linear"]
    if no_trunk and "transfer" in cfg.heads:
        facts["transfer_head"] = "not trained: the encoder's features have no 3D trunk (axial slice features)"
    heads: dict[str, dict[str, Any]] = {}
    predictions = []
    saved: dict[str, np.ndarray] = {"classes": classes}   # the fitted model(s), for Grad-CAM (stages/gradcam.py)
    truth = test.label.to_numpy()
    if train.label.nunique() < 2:   # nothing to learn: the trivial rule, flagged, not a fitted model
        only = int(train.label.iloc[0])
        proba = np.zeros((len(test), len(classes)))
        proba[:, int(np.flatnonzero(classes == only)[0])] = 1.0
        log.warning("%s / subset %s seed %d: every training label is %s; the job predicts it for every test sample",
                    task.name, fraction, subset_seed, only)
        for head in ([END_TO_END_HEAD] if end_to_end else frozen_heads + [name for name, _, _ in slice_heads]):
            heads[head] = {**score(task, truth, proba, classes),
                           "note": f"one class ({only}) in the training subset: predicts it"}
            predictions.append(_predictions(test, proba, classes, head))
    elif end_to_end and inputs.axial is not None:
        _, dropout, weight_decay = slice_cfg.settings()[0]   # the end-to-end baseline: the grid's first pair
        fitted = _slice_fits(train, val, test, classes, inputs, cfg, slice_cfg,
                             [(END_TO_END_HEAD, dropout, weight_decay)], seed, frozen=False)
        proba, info, history, net = fitted[END_TO_END_HEAD]
        saved.update({f"{END_TO_END_HEAD}/{k}": v.detach().cpu().numpy() for k, v in net.state_dict().items()})
        heads[END_TO_END_HEAD] = {**score(task, truth, proba, classes), **info}
        predictions.append(_predictions(test, proba, classes, END_TO_END_HEAD))
    elif end_to_end and on_disc:
        if inputs.discs is None:
            raise ValueError("end-to-end training on the disc volume needs --discs")
        proba, info, history, arrays = _disc_network(train, val, test, classes, inputs, cfg, seed, width,
                                                     embedding_dim)
        saved.update(arrays)
        heads[END_TO_END_HEAD] = {**score(task, truth, proba, classes), **info}
        predictions.append(_predictions(test, proba, classes, END_TO_END_HEAD))
    elif end_to_end:
        if inputs.vertebrae is None:
            raise ValueError("end-to-end training on the bodies needs --vertebrae")
        from stages.nets.disc_net import (
            save_net,
            train_and_predict,  # PyTorch: end to end only
        )
        proba, info, history, net = train_and_predict(task.kind, train, val, test, classes, inputs.vertebrae,
                                                       inputs.encoder, cfg.fit_config(seed), cfg.device,
                                                       (width, embedding_dim))
        saved.update(save_net(net))
        heads[END_TO_END_HEAD] = {**score(task, truth, proba, classes), **info}
        predictions.append(_predictions(test, proba, classes, END_TO_END_HEAD))
    else:
        from threadpoolctl import threadpool_limits
        limits = threadpool_limits(1)   # one BLAS thread: faster on these small matrices, and the same bits always
        if not frozen_heads:
            x_train = x_test = np.zeros((0, 0), dtype=np.float32)
        elif on_disc:
            if inputs.disc_pooled is None or ("transfer" in frozen_heads
                                              and (inputs.disc_maps is None or inputs.disc_trunk is None)):
                raise ValueError("a frozen probe on the disc volume needs --disc-pooled (and --disc-maps and "
                                 "--disc-trunk for the transfer head)")
            pooled = np.load(inputs.disc_pooled, mmap_mode="r")
            x_train, x_test = _rows(pooled, train.row), _rows(pooled, test.row)
        else:
            if inputs.features is None:
                raise ValueError("a frozen probe on the bodies needs --features")
            feats = np.load(inputs.features, mmap_mode="r")
            x_train, x_test = feature_matrix(train, feats), feature_matrix(test, feats)
        y_train = np.searchsorted(classes, train.label.to_numpy())
        groups = train.subject_id.to_numpy()
        for head in frozen_heads:
            if head == "transfer":
                proba, info, hist, arrays = _transfer_head(train, val, test, classes, inputs, cfg, seed)
                history = hist.assign(head="transfer")
                saved.update(arrays)
            else:
                if head == "linear":
                    fitted, info = fit_linear(x_train, y_train, groups, len(classes), cfg, task.binary, seed)
                else:
                    fitted = fit_head(x_train, y_train, len(classes), cfg.mlp_alpha, hidden=cfg.mlp_hidden,
                                      seed=seed, max_iter=cfg.max_iter)
                    info = {"hidden": cfg.mlp_hidden, "alpha": cfg.mlp_alpha, "converged": fitted.converged}
                proba = fitted.predict_proba(x_test)
                saved.update(fitted.to_arrays(head))
            heads[head] = {**score(task, truth, proba, classes), **info}
            predictions.append(_predictions(test, proba, classes, head))
        if slice_heads:
            fitted = _slice_fits(train, val, test, classes, inputs, cfg, slice_cfg, slice_heads, seed, frozen=True)
            for head, (proba, info, hist, net) in fitted.items():
                heads[head] = {**score(task, truth, proba, classes), **info}
                predictions.append(_predictions(test, proba, classes, head))
                history = pd.concat([h for h in (history, hist.assign(head=head)) if len(h)], ignore_index=True)
                saved.update({f"{head}/fc_weight": net.fc.weight.detach().cpu().numpy(),
                              f"{head}/fc_bias": net.fc.bias.detach().cpu().numpy()})
        limits.restore_original_limits()
    result = {**facts, "heads": heads, "seconds": round(time.perf_counter() - started, 2)}
    for path in (out.metrics, out.predictions, out.model, out.history):
        path.parent.mkdir(parents=True, exist_ok=True)
    pd.concat(predictions, ignore_index=True).to_parquet(out.predictions, index=False)
    with open(out.model, "wb") as handle:   # a file object: np.savez would add .npz to a name without it
        np.savez(handle, **saved)
    history.to_csv(out.history, index=False)
    out.metrics.write_text(json.dumps(result, indent=2, default=_plain) + "\n")
    for head, m in heads.items():
        log.info("%s / %s / subset %s seed %d (%d subjects, %d samples) %s head: %s", model, task.name, fraction,
                 subset_seed, len(members), len(train), head,
                 ", ".join(f"{k} {m[k]:.3f}" for k in ("accuracy", "average_class_accuracy", "auc") if k in m))
    return result


def _rows(array: np.ndarray, rows: pd.Series) -> np.ndarray:
    """``array[rows]`` as float32, read in row order (a memory map reads sequentially)."""
    r = rows.to_numpy(dtype=np.int64)
    order = np.argsort(r, kind="stable")
    out = np.empty((len(r), *array.shape[1:]), dtype=np.float32)
    out[order] = array[r[order]]
    return out


def _transfer_head(train: pd.DataFrame, val: pd.DataFrame, test: pd.DataFrame, classes: np.ndarray,
                   inputs: JobInputs, cfg: ProbeConfig, seed: int) -> tuple[np.ndarray, dict[str, Any],
                                                                            pd.DataFrame, dict[str, np.ndarray]]:
    """FC6-FC8 (new, random) on the frozen Conv1-Conv5 features cached per view (Jamaludin et al. 2017, 4.2)."""
    import torch

    from stages.nets.disc_cnn import DiscClassifier, load_classifier, save_head
    from stages.training.classify import (
        ClassifierFit,
        fit_classifier,
        predict_logits,
        view_batches,
    )

    trunk = np.load(inputs.disc_trunk)
    spec = load_classifier(trunk, "trunk").spec
    maps = np.load(inputs.disc_maps, mmap_mode="r")
    seeds.seed_torch(seeds.end_to_end(seed))
    net = DiscClassifier(spec, len(classes), cfg.dropout)
    if maps.shape[2] != net.head.layers[0].in_features:
        raise ValueError(f"{inputs.disc_maps} holds {maps.shape[2]}-d features but the trunk's FC6 takes "
                         f"{net.head.layers[0].in_features}: the files are from different encoders")
    fit_rows = np.concatenate([train.row.to_numpy(), val.row.to_numpy()]).astype(np.int64)
    targets = np.searchsorted(classes, np.concatenate([train.label.to_numpy(), val.label.to_numpy()]))
    device = torch.device("cpu")   # FC layers on cached features: small
    head, history = fit_classifier(net.head, view_batches(maps, fit_rows, seed, device), targets, len(train),
                                   len(val), len(classes), ClassifierFit.from_section(cfg, seed), device)
    test_rows = test.row.to_numpy(dtype=np.int64)
    logits = predict_logits(head, view_batches(maps, test_rows, seed, device), np.arange(len(test)), cfg.batch_size)
    proba = torch.softmax(logits, 1).numpy()
    info = {"epochs_run": len(history), "kept_epoch": int(history.epoch[history.kept].iloc[0]),
            "views": int(maps.shape[1]), "init": "frozen encoder convolutions, new FC6-FC8",
            "train_accuracy_kept": float(history.train_accuracy[history.kept].iloc[0])}
    return proba, info, history, save_head(net, "transfer")


def _slice_reader(inputs: JobInputs, rows: np.ndarray, second: np.ndarray | None = None) -> Any:
    """A reader of the discs at ``rows`` by position: ``inputs.axial``'s slices, or where ``second`` is set
    ``inputs.axial_second``'s (a disc's second sample); it reads no other row."""
    import torch

    from stages.nets.disc_net import BodyReader

    rows = np.asarray(rows, dtype=np.int64)
    second = np.zeros(len(rows), dtype=bool) if second is None else np.asarray(second, dtype=bool)
    first_read = BodyReader(inputs.axial, rows[~second])
    second_read = BodyReader(inputs.axial_second, rows[second]) if second.any() else None

    def read(positions: np.ndarray) -> torch.Tensor:
        r, s = rows[positions], second[positions]
        if second_read is None or not s.any():
            return first_read(r)
        out = torch.empty((len(r), *first_read.array.shape[1:]), dtype=torch.float32)
        out[torch.from_numpy(~s)] = first_read(r[~s])
        out[torch.from_numpy(s)] = second_read(r[s])
        return out
    return read


def _slice_encoder(inputs: JobInputs, axial_shape: tuple[int, ...]) -> Any:
    """The extractor of ``inputs.encoder`` (a simclr encoder.pt), or its architecture at pretraining's initial
    weights (``inputs.initial_weights``); checked against the axial slices' size."""
    from stages.nets.simclr import initial_encoder, load_simclr_encoder

    encoder, _ = load_simclr_encoder(inputs.encoder)
    if tuple(axial_shape[-2:]) != (encoder.spec.height, encoder.spec.width_px):
        raise ValueError(f"{inputs.axial} holds {axial_shape[-2]} x {axial_shape[-1]} slices, but {inputs.encoder} "
                         f"was trained on {encoder.spec.height} x {encoder.spec.width_px}")
    return initial_encoder(encoder.spec, inputs.encoder_seed) if inputs.initial_weights else encoder


def _slice_fit_data(train: pd.DataFrame, val: pd.DataFrame, test: pd.DataFrame, classes: np.ndarray,
                    inputs: JobInputs) -> tuple[Any, Any, np.ndarray, int]:
    """Readers of the training samples (then the validation discs) and of the test discs, the training and
    validation targets, and the number of training samples: every training disc, and again through its second
    sample where it has one (Hou et al.: slices 2-4 of a 4-slice disc; ``inputs.axial_second``). Validation and
    test discs are seen through their central three slices."""
    if inputs.axial is None or inputs.encoder is None:
        raise ValueError("Hou et al.'s three-slice classifier needs --axial and --encoder (a simclr encoder.pt)")
    train_rows = train.row.to_numpy(dtype=np.int64)
    extra = train_rows[:0]
    if inputs.axial_second is not None:
        second = np.load(inputs.axial_second, mmap_mode="r")
        extra = train_rows[[bool(np.any(second[r])) for r in train_rows]]
    labels = dict(zip(train_rows, train.label.to_numpy()))
    fit_rows = np.concatenate([train_rows, extra, val.row.to_numpy(dtype=np.int64)])
    is_second = np.concatenate([np.zeros(len(train_rows), bool), np.ones(len(extra), bool), np.zeros(len(val), bool)])
    targets = np.searchsorted(classes, np.concatenate([train.label.to_numpy(), [labels[r] for r in extra],
                                                       val.label.to_numpy()]).astype(train.label.dtype))
    return (_slice_reader(inputs, fit_rows, is_second), _slice_reader(inputs, test.row.to_numpy()), targets,
            len(train_rows) + len(extra))


def _slice_fits(train: pd.DataFrame, val: pd.DataFrame, test: pd.DataFrame, classes: np.ndarray, inputs: JobInputs,
                cfg: ProbeConfig, slice_cfg: SliceHeadConfig, settings: list[tuple[str, float, float]], seed: int,
                frozen: bool) -> dict[str, tuple[np.ndarray, dict[str, Any], pd.DataFrame, Any]]:
    """Hou et al.'s three-slice classifier (stages/training/slice_head.py: shared crops, Adam) once per (name,
    dropout, weight decay) of ``settings``: their head on the frozen extractor (``frozen``), or the extractor and the
    FC layer trained end to end (their supervised baseline). Per name: test probabilities, facts, history, network."""
    from stages.core.runtime import select_device
    from stages.training.slice_head import fit_slices, slice_fit

    device = select_device(cfg.device, "probe_training.device")
    read_fit, read_test, targets, n_fit = _slice_fit_data(train, val, test, classes, inputs)
    encoder = _slice_encoder(inputs, np.load(inputs.axial, mmap_mode="r").shape)
    weights = "initial weights" if inputs.initial_weights else "pretrained"
    fitted = {}
    for name, dropout, weight_decay in settings:
        proba, history, net = fit_slices(encoder, frozen, dropout, read_fit, read_test, targets, n_fit, len(val),
                                         len(test), len(classes), slice_fit(slice_cfg, seed, weight_decay, cfg.threads),
                                         slice_cfg.crop_margin, device)
        info = {"dropout": dropout, "weight_decay": weight_decay, "second_samples": n_fit - len(train),
                "epochs_run": len(history), "kept_epoch": int(history.epoch[history.kept].iloc[0]),
                **({"extractor": weights} if frozen else {"init": weights, "device": str(device)}),
                "train_accuracy_kept": float(history.train_accuracy[history.kept].iloc[0])}
        fitted[name] = (proba, info, history, net)
    return fitted


def _disc_network(train: pd.DataFrame, val: pd.DataFrame, test: pd.DataFrame, classes: np.ndarray,
                  inputs: JobInputs, cfg: ProbeConfig, seed: int, width: float,
                  embedding_dim: int) -> tuple[np.ndarray, dict[str, Any], pd.DataFrame, dict[str, np.ndarray]]:
    """The disc classifier trained end to end on the disc volume: from ``inputs.encoder``'s convolutions
    (fine-tuning) or from random weights (scratch), with the classification augmentation."""
    import torch

    from stages.core.runtime import select_device
    from stages.nets.disc_cnn import DiscClassifier, disc_spec, save_classifier
    from stages.nets.disc_net import BodyReader
    from stages.nets.encoders import load_encoder
    from stages.nets.siamese import EncoderSpec
    from stages.training.classify import (
        ClassifierFit,
        classification_ranges,
        fit_classifier,
        predict_logits,
        volume_batches,
    )

    device = select_device(cfg.device, "probe_training.device")
    fit_rows = np.concatenate([train.row.to_numpy(), val.row.to_numpy()]).astype(np.int64)
    read = BodyReader(inputs.discs, fit_rows)          # training never reads a test volume
    read_test = BodyReader(inputs.discs, test.row.to_numpy(dtype=np.int64))
    shape = tuple(read.array.shape[1:])
    seeds.seed_torch(seeds.end_to_end(seed))
    if inputs.encoder is not None:
        pretrained, _ = load_encoder(inputs.encoder)
        net = DiscClassifier(disc_spec(pretrained.spec, shape), len(classes), cfg.dropout)
        net.load_trunk(pretrained.state_dict(), str(inputs.encoder))
    else:
        net = DiscClassifier(EncoderSpec(slices=shape[0], height=shape[1], width_px=shape[2], width=width,
                                         embedding_dim=embedding_dim, dropout=0.0), len(classes), cfg.dropout)
    targets = np.searchsorted(classes, np.concatenate([train.label.to_numpy(), val.label.to_numpy()]))
    net, history = fit_classifier(net, volume_batches(lambda pos: read(fit_rows[pos]), classification_ranges(cfg),
                                                      seed, device),
                                  targets, len(train), len(val), len(classes), ClassifierFit.from_section(cfg, seed),
                                  device)
    test_rows = test.row.to_numpy(dtype=np.int64)
    logits = predict_logits(net, volume_batches(lambda pos: read_test(test_rows[pos]), classification_ranges(cfg),
                                                seed, device), np.arange(len(test)), cfg.batch_size)
    info = {"epochs_run": len(history), "kept_epoch": int(history.epoch[history.kept].iloc[0]),
            "init": "pretrained" if inputs.encoder is not None else "random", "device": str(device),
            "train_accuracy_kept": float(history.train_accuracy[history.kept].iloc[0])}
    return torch.softmax(logits, 1).numpy(), info, history, save_classifier(net.cpu(), "cnn")


def _plain(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"cannot write {type(value)} as JSON")


def _predictions(test: pd.DataFrame, proba: np.ndarray, classes: np.ndarray, head: str) -> pd.DataFrame:
    frame = test[["subject_id", "scan_id", "level", "label"]].copy()
    frame.insert(0, "head", head)
    frame["predicted"] = classes[proba.argmax(1)]
    for k, c in enumerate(classes):
        frame[f"p_{c}"] = proba[:, k]
    return frame


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m stages.probe", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="Name of the model (a label in the result tables).")
    parser.add_argument("--task", required=True, choices=sorted(TASKS), help="Downstream task.")
    parser.add_argument("--fraction", type=float, required=True, help="Label subset: share of training subjects.")
    parser.add_argument("--subset-seed", type=int, required=True, help="Label subset nesting (0, 1, ...).")
    cli.add_split_tables(parser)
    parser.add_argument("--disc-input", choices=("disc", "bodies"), default="disc",
                        help="What a disc task reads: the disc volume or the two bodies around it (probes.disc_input; "
                             "default: disc). The level task reads bodies.")
    parser.add_argument("--grade-classes", type=int, nargs=5, default=[1, 2, 3, 4, 5], metavar="CLASS",
                        help="The class of Pfirrmann grades 1..5 (probes.grade_classes; default: 1 2 3 4 5).")
    frozen = parser.add_argument_group("frozen encoder (heads on its features)")
    frozen.add_argument("--features", type=cli.existing_file, help="Bodies: features.npy of the features stage.")
    frozen.add_argument("--disc-maps", type=cli.existing_file, help="Disc: disc_maps.npy of the disc_features stage.")
    frozen.add_argument("--disc-pooled", type=cli.existing_file,
                        help="Disc: disc_pooled.npy of the disc_features stage, or of the axial_features stage (a "
                             "simclr encoder: pooled features only, no transfer head).")
    frozen.add_argument("--disc-trunk", type=cli.existing_file, help="Disc: disc_trunk.npz of the disc_features stage.")
    trained = parser.add_argument_group("end to end (the whole network trained on the label subset)")
    trained.add_argument("--end-to-end", action="store_true", help="Train the whole network, not a head on features.")
    trained.add_argument("--vertebrae", type=cli.existing_file,
                         help="Bodies: vertebrae.npy of the extract stage (the array store it trains on).")
    trained.add_argument("--discs", type=cli.existing_file, help="Disc: discs.npy of the extract stage.")
    trained.add_argument("--encoder", type=cli.existing_file, help="Start from this encoder.pt's convolutions "
                                                                   "(fine-tuning; default: random weights).")
    cli.add_encoder_size_options(parser, "End to end from random weights: ")
    axial = parser.add_argument_group("axial slices (Hou et al. 2023: a simclr encoder's three-slice classifier)")
    axial.add_argument("--axial", type=cli.existing_file,
                       help="The three axial slices of every disc (the axial_slices stage's slices.npy): frozen, the "
                            "slices head (probe_training.heads) on --encoder's extractor; end to end, the extractor "
                            "and that head trained together.")
    axial.add_argument("--axial-second", type=cli.existing_file,
                       help="The second sample of every disc with 4 axial slices (the axial_slices stage's "
                            "second_sample.npy, zeros for other discs): a training disc that has one is trained on "
                            "both samples (Hou et al.).")
    axial.add_argument("--initial-weights", action="store_true",
                       help="Use --encoder's architecture at pretraining's initial weights (--encoder-seed), not its "
                            "trained weights: the random-frozen and from-scratch baselines.")
    axial.add_argument("--encoder-seed", type=int, default=0, help="--initial-weights: pretrain.seed (default: 0).")
    cli.add_section_options(parser, "slice_head", prefix="slice")
    files = parser.add_argument_group("outputs")
    files.add_argument("--metrics", type=Path, required=True, help="metrics.json of this job.")
    files.add_argument("--predictions", type=Path, required=True, help="predictions.parquet of this job.")
    files.add_argument("--model-file", type=Path, required=True, help="model.npz of this job (the fitted model).")
    files.add_argument("--history", type=Path, required=True, help="history.csv of this job (end to end: per epoch).")
    cli.add_section_options(parser, "probe_training")
    cli.add_log_option(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    cfg = ProbeConfig.from_config(cli.section_from_args(args, "probe_training", parser))
    if not 0 < args.fraction <= 1:
        parser.error(f"--fraction must be in (0, 1], got {args.fraction}")
    slice_cfg = SliceHeadConfig.from_config(cli.section_from_args(args, "slice_head", parser, prefix="slice"))
    frozen_inputs = [args.features, args.disc_maps, args.disc_pooled, args.disc_trunk]
    frozen = any(f is not None for f in frozen_inputs) or (args.axial is not None and not args.end_to_end)
    if args.end_to_end == frozen:
        parser.error("give either a frozen encoder's features (--features, --disc-*, or --axial with --encoder) or "
                     "--end-to-end")
    if args.end_to_end and args.vertebrae is None and args.discs is None and args.axial is None:
        parser.error("--end-to-end needs --discs, --vertebrae or --axial (the array store it trains on)")
    if not args.end_to_end and args.encoder is not None and args.axial is None:
        parser.error("--encoder is for --end-to-end (fine-tuning) or --axial (the slices head's extractor); a frozen "
                     "probe reads its encoder's features")
    if args.axial_second is not None and args.axial is None:
        parser.error("--axial-second goes with --axial")
    if (args.axial is not None or args.initial_weights) and args.encoder is None:
        parser.error("--axial and --initial-weights need --encoder (a simclr encoder.pt)")
    cli.setup_logging(args.log, "probe")
    out = JobFiles(args.metrics, args.predictions, args.model_file, args.history)
    inputs = JobInputs(features=args.features, disc_maps=args.disc_maps, disc_pooled=args.disc_pooled,
                       disc_trunk=args.disc_trunk, vertebrae=args.vertebrae, discs=args.discs, encoder=args.encoder,
                       axial=args.axial, axial_second=args.axial_second, initial_weights=args.initial_weights,
                       encoder_seed=args.encoder_seed)
    try:
        grade_mapping(tuple(args.grade_classes))
    except ValueError as err:
        parser.error(str(err))
    run(args.model, args.task, args.fraction, args.subset_seed, args.subjects, args.volumes, out, cfg,
        end_to_end=args.end_to_end, width=args.width, embedding_dim=args.embedding_dim, disc_input=args.disc_input,
        inputs=inputs, grade_classes=tuple(args.grade_classes), slice_cfg=slice_cfg)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
