"""The batch-size study behind `normlab study` (SPEC §3): error versus batch size, per method.

data.py      digits / MNIST-1D / CIFAR-10 pickle / MNIST IDX loaders (`load_dataset`)
model.py     the small CNN, built by method name (`StudyNet`), and SN's importances (`sn_importance`)
train.py     one seeded run with the Group Norm paper's protocol (`RunSpec`, `train_run`)
runner.py    the grid in worker processes, resumable (`StudyConfig`, `study_config`, `run_study`)
results.py   results.jsonl: atomic appends, tolerant reads
progress.py  the progress bar with ETA
report.py    the Markdown tables and the PNG figures
"""

from normlab.study.data import DATASETS, DataError, StudyData, load_dataset
from normlab.study.model import StudyNet, sn_importance
from normlab.study.runner import StudyConfig, StudyOutcome, run_study, study_config
from normlab.study.train import RunSpec, train_run

__all__ = [
    "DATASETS",
    "DataError",
    "RunSpec",
    "StudyConfig",
    "StudyData",
    "StudyNet",
    "StudyOutcome",
    "load_dataset",
    "run_study",
    "sn_importance",
    "study_config",
    "train_run",
]
