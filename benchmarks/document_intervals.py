"""How much a run's alignment intervals narrow when they resample windows instead of documents.

    python benchmarks/document_intervals.py --run runs/quick --out docs/results/testbed_quick/document_intervals.csv

For a finished alignment run on a testbed (its CNNs saved), each row's min F1 interval is computed
twice from the saved eval logits, with the run's bootstrap settings: over eval windows (what the run
reported) and over their source documents (`score_summary(groups=)`). The first testbed's table has no
`document` column; its documents come from its training corpus (rebuilt and cached by
`testbed.membership`), the EOS-delimited document each window sits in (`testbed.table.document_ids`);
a table that has the column (the second testbed's) gives its own.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mechmem.atomic import atomic_write  # noqa: E402
from mechmem.cnn import alignment_summary, load_cnns  # noqa: E402
from mechmem.run import RunFolder  # noqa: E402


def row_intervals(run: RunFolder, slug: str, df: pd.DataFrame, documents: dict[int, int], n_boot: int,
                  seed: int) -> dict:
    """The row's score, its interval over windows and over documents, from every saved seed's CNNs."""
    from mechmem.alignment import Row

    row = run.read_row(slug)
    split = run.split(slug)
    if split.eval_labels is not None:
        y = np.asarray(split.eval_labels)
    else:  # older runs: the row's labels of its eval samples, from the table
        labels = pd.Series(np.asarray(Row(**row["row"]).labels(df)), index=df["sequence_id"].to_numpy())
        y = labels.loc[split.eval_ids].to_numpy()
    trained, k = [], 0
    while True:  # every training seed's CNNs
        folder = run.cnn_folder(slug, k)
        if not (folder / "cnns.json").is_file():
            break
        trained += load_cnns(folder)
        k += 1
    groups = np.array([documents[int(s)] for s in split.eval_ids])
    windows = alignment_summary(trained, y, n_boot=n_boot, seed=seed)
    docs = alignment_summary(trained, y, n_boot=n_boot, seed=seed, groups=groups)
    return {"tax_name": row["tax_name"], "seeds": k, "eval_windows": len(y), "documents": len(set(groups)),
            "min_f1": round(windows["min_f1"], 1), "reported_low": row["min_f1_ci_low"], "reported_high": row["min_f1_ci_high"],
            "windows_low": windows["min_f1_ci_low"], "windows_high": windows["min_f1_ci_high"],
            "documents_low": docs["min_f1_ci_low"], "documents_high": docs["min_f1_ci_high"]}


def documents_of(df: pd.DataFrame, data: str) -> dict[int, int]:
    """Each sample's document by sequence id: the table's `document` column (the second testbed's),
    else, for the first testbed, from its rebuilt training corpus and tokenizer."""
    from mechmem.data import DOCUMENT

    if DOCUMENT in df.columns:
        return dict(zip(df["sequence_id"].tolist(), df[DOCUMENT].tolist()))
    if data != "testbed":
        raise ValueError(f"the table {data!r} has no {DOCUMENT!r} column, and only the first testbed's "
                         "documents can be rebuilt")
    from tokenizers import Tokenizer

    from mechmem.testbed import MODEL_DIR
    from mechmem.testbed.corpus import EOS
    from mechmem.testbed.membership import training_corpus
    from mechmem.testbed.table import document_ids

    corpus = training_corpus()
    eos = Tokenizer.from_file(str(MODEL_DIR / "tokenizer.json")).token_to_id(EOS)
    ids = df["sequence_id"].to_numpy()
    return dict(zip(ids.tolist(), document_ids(ids, (corpus.train_stream, corpus.heldout_stream), eos).tolist()))


def main(argv=None) -> int:
    from mechmem.data import load_memorization_data

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True, help="a CSV, one line a row")
    args = p.parse_args(argv)
    run = RunFolder(args.run)
    settings = run.raw_config()
    df = load_memorization_data(settings["data"], progress=False)
    documents = documents_of(df, settings["data"])
    slugs = sorted(f.stem for f in run.rows_dir.glob("*.json"))
    cfg = settings["config"]
    table = pd.DataFrame([row_intervals(run, s, df, documents, cfg["n_boot"], cfg["seed"])
                          for s in slugs]).sort_values("min_f1", ascending=False)
    table["width_windows"] = table["windows_high"] - table["windows_low"]
    table["width_documents"] = table["documents_high"] - table["documents_low"]
    atomic_write(args.out, lambda tmp: table.round(1).to_csv(tmp, index=False))
    print(table.round(1).to_string(index=False))
    return 0


if __name__ == "__main__":  # bad input (no such run, row or checkpoint): one line, exit 2
    from mechmem import cli

    raise SystemExit(cli.main(f"benchmarks/{Path(__file__).name}", lambda argv: argv, main, sys.argv[1:]))
