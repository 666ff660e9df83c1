"""The alignment configs live apart from the runner, so the run folder reads them without importing it."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

import mechmem.alignment as al
import mechmem.alignment_config as ac
import mechmem.run as run

ROOT = Path(__file__).resolve().parents[1]


def test_the_runner_and_the_run_folder_share_one_class_each():
    """`from mechmem.alignment import AlignmentConfig, Row` (the old spelling) keeps working."""
    assert al.AlignmentConfig is ac.AlignmentConfig is run.AlignmentConfig
    assert al.Row is ac.Row is run.Row and al.PROBE_FITS == ac.PROBE_FITS


def test_the_config_checks_its_settings():
    rows = (ac.Row("merge_2_other_guess_recollect_recite", 5),)
    assert ac.AlignmentConfig(rows=rows).probe_fit == "cnn-fit"
    with pytest.raises(ValueError, match="unknown probe_fit"):
        ac.AlignmentConfig(rows=rows, probe_fit="eval")
    with pytest.raises(ValueError, match="control_seeds"):
        ac.AlignmentConfig(rows=rows, cnn_seeds=1, control_seeds=2)


def test_the_run_folder_imports_alone_without_the_runner():
    """In a fresh interpreter: mechmem.run and its configs load, and the runner is never imported."""
    code = ("import sys, mechmem.run as r; "
            "assert 'mechmem.alignment' not in sys.modules, 'mechmem.run imported mechmem.alignment'; "
            "r.alignment_config_from_dict({'rows': [{'tax_id': 'merge_2_other_guess_recollect_recite'}]}); "
            "assert 'mechmem.alignment' not in sys.modules; import mechmem.alignment")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
