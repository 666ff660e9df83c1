"""The alignment benchmark: how well does each memorization taxonomy align with attention?

Composes the stages: memorization table -> labels per (taxonomy, threshold) -> balanced splits ->
one feature store for every sample any row needs (features do not depend on the taxonomy) ->
CNNs trained per row -> a table of min F1 (the alignment score) with bootstrap intervals.

Every row's result is written as soon as it is computed (`rows/*.json`, atomically), and the
feature store resumes, so an interrupted run picks up where it stopped. Under torchrun the ranks
share the free generation, the extraction and each row's CNN configurations (`mechmem.distributed`);
rank 0 writes the results.
"""

from __future__ import annotations

import functools
import json
import logging
import os
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from mechmem import taxonomy as tx
from mechmem.alignment_config import PROBE_FITS, AlignmentConfig, Row  # noqa: F401  (re-exported)
from mechmem.atomic import atomic_json, atomic_text, atomic_write  # noqa: F401  (atomic_json: re-exported)
from mechmem.cnn import (CNNConfig, Task, TrainedCNN, alignment_summary,
                         load_cnns, save_cnns, score_summary, split_validation, train_cnn_tasks, write_cnn_index)
from mechmem.controls import centred, is_aligned, null_summary, permutation_null, shuffled_control
from mechmem.data import DOCUMENT, SOURCE, tokens_array
from mechmem.distributed import Dist, shard_configs
from mechmem.features import FeatureStore, build_feature_store
from mechmem.memorization import free_generation
from mechmem.models import default_device
from mechmem.probe import attention_statistics, train_probe
from mechmem.run import MODEL_VIEW, RunFolder
from mechmem.timing import phase

# The quick preset: the paper's proposed taxonomy, the original Recite/Reconstruct/Recollect
# family, and a four-class neighbour (display names, as in the paper's tables). Five rows: with
# converged CNNs, three training seeds, controls and the probe, 18 minutes on an idle 2-core CPU.
QUICK_ROWS: tuple[str, ...] = (
    "Non-Memo, Guess, Others",
    "Non-Memo, Reconstruct, Others",
    "Non-Memo, Recite[5], Others",
    "Non-Memo, Recollect[5], Others",
    "Non-Memo, Recite[5], Guess, Others",
)

logger = logging.getLogger(__name__)

TABLE_COLUMNS = ["tax_name", "num_classes", "min_f1", "mean_f1", "min_prec", "mean_prec", "min_rec",
                 "mean_rec", "mean_eval_loss", "min_f1_ci_low", "min_f1_ci_high"]
# Beside the score, what it is measured against (see `_write_row`): the chance level, the permutation
# null's 95th percentile, the same CNNs trained on shuffled labels, the attention-statistics probe,
# the paper's Pythia-12B figure.
CONTROL_COLUMNS = ["min_f1_chance", "min_f1_null_p95", "min_f1_control", "min_f1_control_ci_high", "min_f1_probe",
                   "min_f1_probe_ci_low", "min_f1_probe_ci_high", "aligned", "epochs", "control_epochs",
                   "paper_12b_min_f1"]
# Where the table has a `source` column: the kind-of-text baseline (`source_baseline_logits`), what
# knowing only where each window comes from scores on the same split.
SOURCE_COLUMNS = ["min_f1_source", "min_f1_source_ci_low", "min_f1_source_ci_high", "beyond_source"]
SEED_COLUMN = "min_f1_seed_sd"  # with cnn_seeds > 1: the spread of min F1 over training seeds
CONTROL_SEED_COLUMN = "min_f1_control_seed_sd"  # with control_seeds > 1: the controls' spread over shuffles


def quick_rows(rouge: str = "either", rouge_threshold: float = 0.5) -> tuple[Row, ...]:
    return tuple(Row(*tx.parse_name(n), rouge=rouge, rouge_threshold=rouge_threshold) for n in QUICK_ROWS)


def paper_rows(rouge: str = "either", rouge_threshold: float = 0.5) -> tuple[Row, ...]:
    return tuple(Row(i, t, rouge, rouge_threshold) for i, t in tx.PAPER_ROWS)


@dataclass
class Plan:
    """What each row trains and evaluates on, as positions in the data frame."""

    splits: dict[Row, tuple[np.ndarray, np.ndarray, np.ndarray]] = field(default_factory=dict)  # labels, train, eval
    skipped: dict[Row, str] = field(default_factory=dict)

    @property
    def samples(self) -> np.ndarray:
        """Every data-frame position some row needs: one feature extraction serves them all."""
        parts = [np.concatenate([tr, ev]) for _, tr, ev in self.splits.values()]
        return np.unique(np.concatenate(parts)) if parts else np.array([], dtype=np.int64)


def plan_rows(df: pd.DataFrame, rows: Sequence[Row], train_per_class: int, eval_per_class: int, seed: int,
              scheme: str = "shared", match_source: bool = False) -> Plan:
    """Label and split every row; rows with a class too small are skipped with the reason. With
    `match_source`, Non-Memo is drawn with the memorized classes' mix of `df[SOURCE]`."""
    if match_source and SOURCE not in df.columns:
        raise ValueError(f"match_source needs a {SOURCE!r} column in the memorization table; this one has none")
    match = df[SOURCE].to_numpy() if match_source else None
    plan = Plan()
    for row in rows:
        labels = row.labels(df)
        try:
            tr, ev = tx.balanced_split(labels, len(row.class_names()), train_per_class, eval_per_class, seed,
                                       class_names=row.class_names(), scheme=scheme, match=match)
        except tx.NotEnoughSamples as err:
            plan.skipped[row] = str(err)
            continue
        plan.splits[row] = (labels, np.asarray(tr), np.asarray(ev))
    return plan


def generate_model_view(model, df: pd.DataFrame, positions: np.ndarray, *, batch_size: int = 256) -> np.ndarray:
    """The 64 tokens the model is shown: memorized samples as they are, others with the model's own
    greedy continuation as suffix (METHOD.md section 3), so every sample is the model generating.

    A table whose `greedy_suffix` column was decoded by this very model (`df.attrs["greedy_model"]`
    names it, as the testbed's does) spares the decoding; any other model decodes afresh.
    """
    tokens = tokens_array(df.iloc[positions])
    scores = df["memorization_score"].to_numpy()[positions]
    continuation = None
    if "greedy_suffix" in df and df.attrs.get("greedy_model") == getattr(model, "mechmem_name", None):
        continuation = torch.from_numpy(np.stack(df["greedy_suffix"].to_numpy()[positions]).astype(np.int64))
    view = free_generation(model, torch.from_numpy(tokens), scores, continuation=continuation, batch_size=batch_size)
    return np.asarray(view)


# Fields that may differ when a run resumes: where and in what batches the work runs, and which rows
# are asked for (a finished row keeps its numbers). Every other field of AlignmentConfig and its
# TrainConfig decides a row's numbers, so a field added later is checked on resume by default.
RESUMABLE_FIELDS = frozenset({"rows", "sweep", "extraction_batch_size", "chunk_size",
                              "train.device", "train.fuse", "train.eval_batch_size"})


def result_settings(cfg: AlignmentConfig) -> dict:
    """The settings that decide a finished row's numbers: every config field but RESUMABLE_FIELDS."""
    flat = {}
    for key, value in asdict(cfg).items():
        for k, v in (value.items() if key == "train" else [(None, value)]):
            name = key if k is None else f"{key}.{k}"
            if name not in RESUMABLE_FIELDS:
                flat[name] = v
    flat["configs"] = [c.name for c in cfg.configs]
    return json.loads(json.dumps(flat))  # as settings.json holds it: tuples are lists


def check_resume(out: str | os.PathLike, cfg: AlignmentConfig) -> None:
    """Refuse to add rows to a run folder whose finished rows were computed with other settings:
    a resumed run would skip them and mix two experiments in one table."""
    path = RunFolder(out).settings_file
    if not path.exists():
        return
    old, new = json.loads(path.read_text()), result_settings(cfg)
    changed = [f"{k} {old.get(k)!r} -> {v!r}" for k, v in new.items() if old.get(k) != v]
    if changed:
        raise ValueError(f"{out} holds rows computed with other settings ({'; '.join(changed)}): "
                         "rerun with the same settings to resume, or write to another --out")


def run_alignment(model, df: pd.DataFrame, cfg: AlignmentConfig, out: str | os.PathLike, *,
                  progress: bool = True, dist: Dist = Dist()) -> pd.DataFrame:
    """Run every row of `cfg` on `df` with `model`; write into `out` and return the table.

    Under torchrun pass `dist` (`mechmem.distributed.init_from_env()`): every rank returns the table.
    """
    out = Path(out)
    main = dist.is_main
    progress = progress and main
    check_resume(out, cfg)
    all_rows = tuple(dict.fromkeys(cfg.rows + cfg.sweep))
    plan = plan_rows(df, all_rows, cfg.train_per_class, cfg.eval_per_class, cfg.seed, cfg.split, cfg.match_source)
    for row, reason in plan.skipped.items():
        if main:
            logger.info("skipped %s: %s", row.name, reason)
    run = RunFolder(out)
    if not plan.splits:
        if main:  # why each row was skipped: a study across checkpoints records it and goes on
            atomic_json(run.skipped_file, {r.name: reason for r, reason in plan.skipped.items()})
        raise ValueError("no taxonomy row has enough samples in every class; lower --train-per-class/--eval-per-class")
    todo = [row for row in plan.splits if not run.has_row(row.slug)]
    dist.barrier()  # every rank has its to-do list before rank 0 writes anything
    if main:
        run.rows_dir.mkdir(parents=True, exist_ok=True)
        atomic_json(run.settings_file, result_settings(cfg))
        atomic_json(run.skipped_file, {r.name: reason for r, reason in plan.skipped.items()})

    store = feature_store_for(model, df, plan.samples, run.features_dir, cfg, progress=progress, dist=dist)
    positions = plan.samples
    with phase("load features"):  # float16, read once for all rows, onto the device that trains the CNNs
        features = store.tensor(default_device(cfg.train.device))
    my_configs = shard_configs(cfg.configs, dist)
    # Rows with as many classes and training samples train together, in lockstep (`train_cnn_tasks`).
    groups: dict[tuple[int, int], list[Row]] = {}
    for row in todo:
        groups.setdefault((len(row.class_names()), len(plan.splits[row][1])), []).append(row)
    with phase("probe"), phase("statistics"):
        statistics = attention_statistics(features) if cfg.probe and main else None
    # The probes need only the statistics and the splits: with the CNNs on a GPU they are fitted on
    # the CPU's cores meanwhile (the same fits, so the same numbers), and the "probe/fit" phase is
    # what is left to wait for.
    group_tasks = {key: [_store_task(plan.splits[row], positions) for row in rows] for key, rows in groups.items()}
    background = ThreadPoolExecutor(1) if statistics is not None and _probes_in_background(cfg) else None
    probe_jobs: dict[tuple[int, int], Future] = {}
    if background is not None and statistics is not None:
        for key, tasks in group_tasks.items():
            probe_jobs[key] = background.submit(_probe_all, statistics, tasks, key[0], cfg, spare_core=True)
    for (n_classes, n_train), rows in tqdm(groups.items(), desc="taxonomy groups", disable=not progress):
        tasks = group_tasks[(n_classes, n_train)]
        # Every training seed of every row in one pass (`Task.seed`), and each row's shuffled-label
        # control beside it, stopping with it (config by config, last weights: `Task.follows`).
        seeded = [replace(task, seed=cfg.train.seed + k) for k in range(cfg.cnn_seeds) for task in tasks]
        n_controls = cfg.control_seeds if cfg.controls else 0
        controls = [shuffled_control(seeded[i], cfg.seed + i // len(tasks), follows=i)
                    for i in range(n_controls * len(tasks))]
        with phase("cnns"):
            mine = train_cnn_tasks(features, store.pooling, seeded + controls, n_classes, my_configs, cfg.train,
                                   progress=progress) if my_configs else [[] for _ in seeded + controls]
        by_seed, control_by_seed = [], []  # [seed][row] -> the row's CNNs (all configs on rank 0)
        with phase("saving"):
            for k in range(cfg.cnn_seeds):
                by_seed.append([_gather_cnns(row_cnns, cfg.configs, run.cnn_folder(row.slug, k), dist)
                                for row, row_cnns in zip(rows, mine[k * len(tasks):(k + 1) * len(tasks)])])
            for k in range(n_controls):
                start = (cfg.cnn_seeds + k) * len(tasks)
                control_by_seed.append([_gather_cnns(row_cnns, cfg.configs, run.cnn_folder(row.slug, f"control{k or ''}"),
                                                     dist) for row, row_cnns in zip(rows, mine[start:start + len(tasks)])])
        with phase("probe"), phase("fit"):
            probes: list[Tensor | None] = [None] * len(tasks)
            if (n_classes, n_train) in probe_jobs:
                probes = probe_jobs[(n_classes, n_train)].result()
            elif statistics is not None:
                probes = list(_probe_all(statistics, tasks, n_classes, cfg))
        for i, (row, task, probe) in enumerate(zip(rows, tasks, probes)):
            if main:
                with phase("scoring"):
                    _write_row(out, df, row, [seed_cnns[i] for seed_cnns in by_seed],
                               [seed_cnns[i] for seed_cnns in control_by_seed], probe, task, plan.splits[row], cfg)
    if background is not None:
        background.shutdown()
    dist.barrier()  # rank 0 has written every row
    table = collect_table(out, [r for r in cfg.rows if r in plan.splits])
    if main:
        write_outputs(table, out)
    if main and cfg.sweep:
        sweep = rouge_table(collect_table(out, [r for r in cfg.sweep if r in plan.splits]))
        atomic_write(RunFolder(out).rouge_sweep_file, lambda tmp: sweep.round(4).to_csv(tmp, index=False))
    return table


def _store_task(split, positions: np.ndarray) -> Task:
    """A row's split as rows of the feature store (which holds the sorted data-frame positions)."""
    labels, train_pos, eval_pos = split
    tr, ev = np.searchsorted(positions, train_pos), np.searchsorted(positions, eval_pos)
    store_labels = np.zeros(len(positions), dtype=np.int64)
    store_labels[tr], store_labels[ev] = labels[train_pos], labels[eval_pos]
    return Task(store_labels, tr, ev)


def _probe_logits(statistics: np.ndarray, task: Task, n_classes: int, cfg: AlignmentConfig) -> Tensor:
    """The attention-statistics probe's eval logits, fitted on the samples `cfg.probe_fit` names."""
    labels, train_idx = np.asarray(task.labels), np.asarray(task.train_idx)
    if cfg.probe_fit == "cnn-fit":  # the first seed's fit part: what its CNNs took gradient steps on
        assert cfg.train.val_fraction is not None  # TrainConfig.__post_init__
        train_idx = split_validation(labels, train_idx, cfg.train.val_fraction, cfg.train.seed)[0]
    return train_probe(statistics, labels, train_idx, np.asarray(task.eval_idx), n_classes, seed=cfg.seed).eval_logits


def _probes_in_background(cfg: AlignmentConfig) -> bool:
    """Fit the probes while the CNNs train: where the CNNs train on a GPU (on a CPU both would share
    its cores, and the run stays as it was)."""
    return default_device(cfg.train.device).type == "cuda"


def _probe_all(statistics: np.ndarray, tasks: Sequence[Task], n_classes: int, cfg: AlignmentConfig,
               spare_core: bool = False) -> list[Tensor]:
    """The probes of a group's rows, fitted side by side on the CPU's cores (joblib, scikit-learn's
    own engine): one fit is single-threaded, and at Pythia-2.8b (1024 statistics, 12,800 samples) it
    took 76 s on an H100 machine's CPU, more than the row's CNNs. `spare_core`: one core left to the
    process that drives the GPU meanwhile, and the fits in worker processes even for one row: a fit
    in a thread of this process competes for its interpreter lock and cores (beside one, a one-row
    group's CNN phase took 1.9x as long, H100, benchmarks/README.md)."""
    from joblib import Parallel, delayed

    n_jobs = min(len(tasks), max(1, (os.cpu_count() or 1) - spare_core))
    if spare_core:
        n_jobs = max(n_jobs, 2)  # joblib runs n_jobs=1 in this process
    if n_jobs == 1:
        return [_probe_logits(statistics, task, n_classes, cfg) for task in tasks]
    return Parallel(n_jobs=n_jobs)(delayed(_probe_logits)(statistics, task, n_classes, cfg) for task in tasks)


def paper_reference(size: str = "12b") -> pd.DataFrame:
    """The paper's alignment table for Pythia-{size} (its Table 3, large), shipped in mechmem/reference."""
    path = Path(__file__).parent / "reference" / f"paper_large_table_{size}.csv"
    if not path.exists():
        raise FileNotFoundError(f"no paper table for Pythia-{size}; shipped: 2.8b, 6.9b, 12b")
    return pd.read_csv(path)


@functools.cache
def _paper_min_f1(size: str) -> pd.Series:
    """The paper's min F1 by display name, read once (every row of a run looks its figure up)."""
    return paper_reference(size).set_index("tax_name")["min_f1"]


def score_row(by_seed: Sequence[Sequence[TrainedCNN]], control_by_seed: Sequence[Sequence[TrainedCNN]],
              probe: Tensor | None, y_eval: np.ndarray, n_classes: int, cfg: AlignmentConfig,
              groups: np.ndarray | None = None) -> dict:
    """A row's alignment score (min F1 of its CNNs over every config and seed, with its bootstrap
    interval and seed spread) beside its controls (`mechmem.controls`), and whether it is aligned.

    `min_f1_chance` is 100 / classes, the expected F1 of a class when predictions ignore the input on
    balanced classes; `min_f1_null_p95` the 95th percentile of the permutation null, the min F1 of
    an input-blind classifier guessing with the eval class proportions (`min_f1_null_p`: the score's
    p-value under it); `min_f1_control` the shuffled-label CNNs' score on centred
    logits (over `control_seeds` shuffles, their spread `min_f1_control_seed_sd`); `min_f1_probe` the
    attention-statistics probe's. `aligned`: the score clears the null and its interval lies above
    the control's. With `groups` (each eval sample's source document) every interval resamples
    documents, not samples (`interval_unit`).
    """
    trained = [cnn for seed_cnns in by_seed for cnn in seed_cnns]
    summary = alignment_summary(trained, y_eval, n_boot=cfg.n_boot, seed=cfg.seed, groups=groups)
    if len(by_seed) > 1:  # each seed's own score (no interval needed), and their spread
        per_seed = [alignment_summary(c, y_eval, n_boot=1)["min_f1"] for c in by_seed]
        summary |= {"min_f1_per_seed": per_seed, SEED_COLUMN: float(np.std(per_seed, ddof=1))}
    summary |= {"min_f1_chance": 100.0 / n_classes, "epochs": float(np.mean([t.epochs_run for t in trained])),
                "protocol": cfg.train.protocol}
    null = permutation_null(y_eval, cfg.null_permutations, seed=cfg.seed)
    summary |= null_summary(null, summary["min_f1"])
    if control_by_seed:
        control = [cnn for seed_cnns in control_by_seed for cnn in seed_cnns]
        centred_by_seed = [[centred(t.eval_logits) for t in seed_cnns] for seed_cnns in control_by_seed]
        c = score_summary([lg for seed_logits in centred_by_seed for lg in seed_logits], y_eval, n_boot=cfg.n_boot,
                          seed=cfg.seed, groups=groups)
        summary |= {"min_f1_control": c["min_f1"], "min_f1_control_ci_low": c["min_f1_ci_low"],
                    "min_f1_control_ci_high": c["min_f1_ci_high"],
                    "min_f1_control_argmax": alignment_summary(control, y_eval, n_boot=1)["min_f1"],
                    "control_epochs": float(np.mean([t.epochs_run for t in control]))}
        if len(control_by_seed) > 1:
            per_shuffle = [score_summary(seed_logits, y_eval, n_boot=1)["min_f1"] for seed_logits in centred_by_seed]
            summary |= {"min_f1_control_per_seed": per_shuffle, CONTROL_SEED_COLUMN: float(np.std(per_shuffle, ddof=1))}
    summary["aligned"] = is_aligned(summary)
    if probe is not None:
        p = score_summary([probe], y_eval, n_boot=cfg.n_boot, seed=cfg.seed, names=["probe"], groups=groups)
        summary |= {"min_f1_probe": p["min_f1"], "min_f1_probe_ci_low": p["min_f1_ci_low"],
                    "min_f1_probe_ci_high": p["min_f1_ci_high"]}
    return summary


def _write_row(out: Path, df: pd.DataFrame, row: Row, by_seed: list[list[TrainedCNN]],
               control_by_seed: list[list[TrainedCNN]], probe, task: Task, split, cfg) -> None:
    """rows/{slug}.json: the row's scores beside its controls (`score_row`), the paper's figure,
    per-class F1, confusion and samples."""
    _, train_pos, eval_pos = split
    trained = [cnn for seed_cnns in by_seed for cnn in seed_cnns]
    n_classes = len(row.class_names())
    groups = df[DOCUMENT].to_numpy()[eval_pos] if DOCUMENT in df.columns else None  # task.eval_idx's order
    labels = np.asarray(task.labels)
    y_eval = labels[task.eval_idx]
    summary = score_row(by_seed, control_by_seed, probe, y_eval, n_classes, cfg, groups)
    paper = _paper_min_f1("12b")
    if row.name in paper.index and (row.rouge, row.rouge_threshold) == ("either", 0.5):
        summary["paper_12b_min_f1"] = float(paper[row.name])
    confusion = np.sum([t.eval_metrics.confusion for t in trained], axis=0)
    per_class_f1 = np.mean([t.eval_metrics.f1 for t in trained], axis=0)
    by_source = {}
    if SOURCE in df.columns:
        sources = df[SOURCE].to_numpy()
        eval_sources = sources[eval_pos]
        by_source["confusion_by_source"] = confusion_by_group([t.eval_logits for t in trained], y_eval, eval_sources,
                                                              n_classes)
        if probe is not None:
            by_source["probe_confusion_by_source"] = confusion_by_group([probe], y_eval, eval_sources, n_classes)
        summary |= source_baseline_scores(sources[train_pos], labels[task.train_idx], eval_sources, y_eval, n_classes,
                                          summary["min_f1_ci_low"], n_boot=cfg.n_boot, seed=cfg.seed, groups=groups)
    RunFolder(out).write_row(row.slug, {
        "tax_name": row.name, "num_classes": n_classes, **summary, "row": asdict(row),
        "class_names": row.class_names(), "per_class_f1": (100 * per_class_f1).tolist(),
        "confusion": confusion.tolist(), **by_source,
        "train_sequence_ids": df["sequence_id"].to_numpy()[train_pos].tolist(),
        "eval_sequence_ids": df["sequence_id"].to_numpy()[eval_pos].tolist(),
    })


def source_baseline_logits(train_sources: np.ndarray, train_labels: np.ndarray, eval_sources: np.ndarray,
                           n_classes: int) -> Float[Tensor, "sample class"]:
    """The kind-of-text baseline, fitted on exactly the CNNs' training samples: each eval sample gets
    its source's class frequencies among them (add-one smoothed, as log probabilities), so it calls
    every window of a source that source's most frequent class (a source never trained on: Non-Memo,
    the first class). A row whose CNN scores near it may be telling sources apart, not memorization."""
    counts = {s: np.bincount(train_labels[train_sources == s], minlength=n_classes) for s in set(train_sources.tolist())}
    rows = [counts.get(s, np.zeros(n_classes, dtype=np.int64)) + 1.0 for s in eval_sources.tolist()]
    freq = np.stack(rows)
    return torch.from_numpy(np.log(freq / freq.sum(1, keepdims=True))).float()


def source_baseline_scores(train_sources: np.ndarray, train_labels: np.ndarray, eval_sources: np.ndarray,
                           y_eval: np.ndarray, n_classes: int, cnn_ci_low: float, *, n_boot: int, seed: int,
                           groups: np.ndarray | None = None) -> dict:
    """A row's SOURCE_COLUMNS: the kind-of-text baseline's min F1 [95% CI] on the eval samples, and
    whether the CNN's interval (its low end `cnn_ci_low`) lies above it."""
    logits = source_baseline_logits(train_sources, train_labels, eval_sources, n_classes)
    b = score_summary([logits], y_eval, n_boot=n_boot, seed=seed, names=["source"], groups=groups)
    return dict(zip(SOURCE_COLUMNS, (b["min_f1"], b["min_f1_ci_low"], b["min_f1_ci_high"], bool(cnn_ci_low > b["min_f1"]))))


def confusion_by_group(logits: Sequence[Tensor], y_eval: np.ndarray, groups: np.ndarray, n_classes: int) -> dict:
    """{group: confusion (true x predicted) summed over the classifiers' `logits`}, e.g. by source."""
    predicted = [lg.argmax(-1).numpy() for lg in logits]
    out = {}
    for g in dict.fromkeys(groups.tolist()):
        inside = groups == g
        counts = np.sum([np.bincount(y_eval[inside] * n_classes + p[inside], minlength=n_classes ** 2)
                         for p in predicted], axis=0)
        out[str(g)] = counts.reshape(n_classes, n_classes).tolist()
    return out


def source_confusion(row: dict, key: str = "confusion_by_source") -> pd.DataFrame:
    """A row's eval samples by (true class, source): how many, and the share its classifiers (the
    CNNs, or `key="probe_confusion_by_source"`) called each class. Where a class's sources are
    called alike, the CNN separates the class, not the kind of text; where Non-Memo samples of one
    source are called a memorized class, the kind of text may be what it learnt."""
    names, records = row["class_names"], []
    n_classifiers = 1 if key.startswith("probe") else row["n_configs"]  # (every CNN of the row: configs x seeds)
    for source, matrix in row.get(key, {}).items():
        for c, counts in enumerate(np.asarray(matrix, dtype=float)):
            if counts.sum():
                records.append({"true": names[c], "source": source, "n": int(counts.sum()) // n_classifiers,
                                **{f"called {n}": counts[k] / counts.sum() for k, n in enumerate(names)}})
    return pd.DataFrame.from_records(records)


def _gather_cnns(mine: list[TrainedCNN], configs: Sequence[CNNConfig], folder: Path, dist: Dist) -> list[TrainedCNN]:
    """Save this rank's CNNs of a row; on rank 0, return all the row's CNNs in the grid's order."""
    save_cnns(mine, folder, index=dist.world_size == 1)
    if dist.world_size == 1:
        return mine
    dist.barrier()  # every rank's CNNs are on disk
    if not dist.is_main:
        return []
    write_cnn_index(folder, [c.name for c in configs])
    return load_cnns(folder)


def feature_store_for(model, df: pd.DataFrame, positions: np.ndarray, folder: Path, cfg: AlignmentConfig,
                      *, progress: bool = True, dist: Dist = Dist()) -> FeatureStore:
    """The store of these samples' features, built (or resumed) once for every row."""
    ids = df["sequence_id"].to_numpy()[positions]
    view_file = folder.parent / MODEL_VIEW
    cached = view_file.exists()
    dist.barrier()  # every rank has looked before rank 0 writes the cache
    if cached:  # free generation is cached: it is the slow half of a resumed run
        cache = np.load(view_file)
        if not np.array_equal(cache["sequence_ids"], ids):
            raise ValueError(f"{view_file} holds other samples: use a new --out folder or delete it")
        tokens = cache["tokens"]
    else:  # each rank decodes a contiguous slice; the slices are joined in order
        part = np.array_split(positions, dist.world_size)[dist.rank]
        with phase("generation"):
            tokens = np.concatenate(dist.all_gather(generate_model_view(model, df, part)))
        if dist.is_main:
            view_file.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(view_file, lambda tmp: np.savez(tmp, sequence_ids=ids, tokens=tokens))
    with phase("extraction"):
        return build_feature_store(folder, model, ids, tokens, pooling=cfg.pooling,
                                   batch_size=cfg.extraction_batch_size, chunk_size=cfg.chunk_size,
                                   progress=progress, dist=dist)


def collect_table(out: Path, rows: Sequence[Row]) -> pd.DataFrame:
    """The paper's table (figures in percent), sorted as its tables are: by classes, then min F1."""
    run = RunFolder(out)
    records = [run.read_row(r.slug) for r in rows]
    table = pd.DataFrame.from_records(records)
    table = table.sort_values(["num_classes", "min_f1"], ascending=[False, False]).reset_index(drop=True)
    return table


def table_columns(table: pd.DataFrame) -> list[str]:
    """The paper's columns, then the controls and the seed spread that this run has."""
    return TABLE_COLUMNS + [c for c in CONTROL_COLUMNS + SOURCE_COLUMNS + [SEED_COLUMN, CONTROL_SEED_COLUMN,
                                                                           "interval_unit"] if c in table]


def write_outputs(table: pd.DataFrame, out: Path) -> None:
    """alignment.csv, alignment.md, a bar chart of min F1 with intervals and controls, best/worst confusion."""
    from mechmem.plots import confusion_png, min_f1_bar_png

    csv = table[table_columns(table)].round(4)
    run = RunFolder(out)
    atomic_write(run.table_file, lambda tmp: csv.to_csv(tmp, index=False))
    atomic_text(run.table_md_file, markdown_table(csv) + "\n" + ranking_text(table, markdown=True))
    atomic_json(run.path / "paper_agreement.json", paper_agreement(table), indent=2)
    by_source = [source_confusion(r, key).assign(tax_name=r["tax_name"], classifier=who)
                 for r in table.to_dict("records") for key, who in (("confusion_by_source", "CNNs"),
                                                                    ("probe_confusion_by_source", "probe"))
                 if isinstance(r.get(key), dict)]
    if by_source:  # long format: one line per (row, classifier, true class, source, called class)
        long = pd.concat([t.melt(id_vars=["tax_name", "classifier", "true", "source", "n"], var_name="called",
                                 value_name="share") for t in by_source])
        long["called"] = long["called"].str.removeprefix("called ")
        atomic_write(run.path / BY_SOURCE, lambda tmp: long.round(4).to_csv(tmp, index=False))
    min_f1_bar_png(table, out / "min_f1.png")
    best, worst = table.loc[table["min_f1"].idxmax()], table.loc[table["min_f1"].idxmin()]
    for tag, r in (("best", best), ("worst", worst)):
        confusion_png(np.array(r["confusion"]), r["class_names"], f"{r['tax_name']} (min F1 {r['min_f1']:.1f})",
                      out / f"confusion_{tag}.png")


HEADLINE_ROW = "Non-Memo, Guess, Others"  # the paper's best taxonomy (89.2 at 12B)
BY_SOURCE = "by_source.csv"  # each row's calls by the eval samples' source, where the table has one


def paper_agreement(table: pd.DataFrame) -> dict:
    """How a run's table agrees with the paper's Pythia-12B figures, the questions a new model or
    testbed is asked first: Spearman rank correlation of min F1 over the rows the paper reports
    (all of them, the three-class ones, the four-class ones; with p-values: within a class count the
    rows are few), where the paper's headline row ranks, and on how many rows the CNN beats the
    attention-statistics probe (score above the probe's interval), ties it (intervals overlap) or
    loses (probe above the CNN's interval). Written beside alignment.csv as paper_agreement.json."""
    from scipy.stats import spearmanr

    out: dict = {"rows": int(len(table))}
    ranked = table.sort_values("min_f1", ascending=False).reset_index(drop=True)
    at = ranked.index[ranked["tax_name"] == HEADLINE_ROW]
    if len(at):
        out["headline_row"] = {"name": HEADLINE_ROW, "rank": int(at[0]) + 1, "of": int(len(ranked)),
                               "min_f1": float(ranked.at[at[0], "min_f1"])}
    if "paper_12b_min_f1" in table:
        with_paper = table.dropna(subset=["paper_12b_min_f1"])
        for key, part in (("all", with_paper), ("3 classes", with_paper[with_paper["num_classes"] == 3]),
                          ("4 classes", with_paper[with_paper["num_classes"] == 4])):
            if len(part) >= 3:
                rho, p = spearmanr(part["min_f1"], part["paper_12b_min_f1"])
                out.setdefault("spearman_with_paper_12b", {})[key] = {"rho": float(rho), "p": float(p),
                                                                      "rows": int(len(part))}
    if {"min_f1_probe_ci_low", "min_f1_probe_ci_high"} <= set(table):
        probe = table.dropna(subset=["min_f1_probe"])
        out["cnn_vs_probe"] = {
            "cnn_above_probe_interval": int((probe["min_f1"] > probe["min_f1_probe_ci_high"]).sum()),
            "probe_above_cnn_interval": int((probe["min_f1_probe"] > probe["min_f1_ci_high"]).sum()),
            "cnn_at_or_above_probe": int((probe["min_f1"] >= probe["min_f1_probe"]).sum()),
            "rows": int(len(probe))}
    return out


def markdown_table(table: pd.DataFrame) -> str:
    def fmt(v):
        if isinstance(v, (bool, np.bool_)):
            return "yes" if v else "**no**"
        return f"{v:.1f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(table.columns) + " |", "|" + "---|" * len(table.columns)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in table.itertuples(index=False)]
    return "\n".join(lines) + "\n"


def overlapping_ranks(table: pd.DataFrame) -> list[list[int]]:
    """For each row of `table` sorted by min F1 (best first), the other ranks whose 95% intervals
    overlap its own: rows that this run cannot tell apart."""
    t = table.sort_values("min_f1", ascending=False)
    lo, hi = t["min_f1_ci_low"].to_numpy(), t["min_f1_ci_high"].to_numpy()
    return [[j + 1 for j in range(len(t)) if j != i and lo[i] <= hi[j] and lo[j] <= hi[i]] for i in range(len(t))]


def not_aligned_reason(r: dict) -> str | None:
    """Why a row of the table is not aligned ("below the null", "within its control"); None if it is,
    or if the run recorded no verdict."""
    aligned = r.get("aligned")
    if aligned is None or (isinstance(aligned, float) and np.isnan(aligned)) or bool(aligned):
        return None
    p95 = r.get("min_f1_null_p95")
    if p95 is not None and not (isinstance(p95, float) and np.isnan(p95)) and r["min_f1"] <= p95:
        return "below the null"
    return "within its control"


def ranking_text(table: pd.DataFrame, markdown: bool = False) -> str:
    """Rows best first: score and interval, seed spread, the controls, and the ranks it cannot be told
    apart from; a row whose interval does not clear its shuffled-label control is flagged."""
    t = table.sort_values("min_f1", ascending=False)
    seeds = " (seeds sd: spread over training seeds)" if SEED_COLUMN in t else ""
    unit = " over documents" if "interval_unit" in t else ""
    source = " | source (the kind-of-text baseline)" if "min_f1_source" in t else ""
    lines = [f"Ranking: min F1 % [95% bootstrap interval{unit}]{seeds} | probe{source} | null (95th percentile of "
             "the permutation null) | shuffled-label control | chance | paper Pythia-12B; '~ n' lists the ranks "
             "whose intervals overlap.", ""]
    for rank, (r, ties) in enumerate(zip(t.to_dict("records"), overlapping_ranks(t)), 1):
        def get(key, fmt="5.1f", missing="  -  ", r=r):
            v = r.get(key)
            return missing if v is None or (isinstance(v, float) and np.isnan(v)) else format(v, fmt)

        parts = [f"{rank:>2}. {r['min_f1']:5.1f} [{r['min_f1_ci_low']:5.1f}, {r['min_f1_ci_high']:5.1f}]"]
        if SEED_COLUMN in r:
            parts.append(f"(seeds sd {get(SEED_COLUMN, '4.1f', ' -  ')})")
        parts.append(f"| probe {get('min_f1_probe')}")
        if "min_f1_source" in r:
            parts.append(f"| source {get('min_f1_source')}")
        parts += [f"| null {get('min_f1_null_p95')}",
                  f"| control {get('min_f1_control')}",
                  f"| chance {get('min_f1_chance', '4.1f')}", f"| paper {get('paper_12b_min_f1', '4.1f', ' -  ')}"]
        flag = f"  NOT ALIGNED ({why})" if (why := not_aligned_reason(r)) else ""
        if r.get("beyond_source") is False:
            flag += "  (within the kind-of-text baseline)"
        tie = f"  ~ {','.join(map(str, ties))}" if ties else ""
        lines.append(" ".join(parts) + f"  {r['tax_name']}{flag}{tie}")
    text = "\n".join(lines)
    return f"```\n{text}\n```\n" if markdown else text


# --------------------------------------------------------------------------------------------
# ROUGE-threshold sweep (the paper's Table 4) on the same features
# --------------------------------------------------------------------------------------------
SWEEP_TAXONOMY = "Non-Memo, Guess, Others"
SWEEP_ROUGES = (("Yes", "Yes", "either"), ("Yes", "No", "L"), ("No", "Yes", "3"))


def sweep_rows(thresholds: Sequence[float] = tuple(np.round(np.arange(0.1, 1.0, 0.1), 1))) -> tuple[Row, ...]:
    tax_id, t = tx.parse_name(SWEEP_TAXONOMY)
    return tuple(Row(tax_id, t, rouge, float(rho)) for _, _, rouge in SWEEP_ROUGES for rho in thresholds)


def rouge_table(table: pd.DataFrame) -> pd.DataFrame:
    """Rows of a sweep run in the paper's `04_rouge_table.csv` columns."""
    flags = {rouge: (l, three) for l, three, rouge in SWEEP_ROUGES}
    records = []
    for r in table.itertuples():
        row = r.row
        l, three = flags[row["rouge"]]
        records.append({"Rouge-L": l, "Rouge-3": three, "Threshold": row["rouge_threshold"],
                        **{c: getattr(r, c) for c in TABLE_COLUMNS[2:]}})
    return pd.DataFrame.from_records(records).sort_values("min_f1", ascending=False).reset_index(drop=True)
