"""Training: the config (``TrainConfig``), the loop (``Trainer``: one adapter or several, one rank or many),
checkpoints, and ``loramix train``.

Example:
    >>> from loramix.train import Trainer, load_train_config
    >>> Trainer(load_train_config("examples/mixlora.yaml", ["max_steps=50"])).run()
"""

from .checkpoint import CheckpointError, latest_checkpoint
from .config import DataConfig, TrainConfig, load_train_config, train_config_from_dict
from .job import Job, lr_factor
from .loop import Trainer, TrainingDiverged
from .run_lock import RunFolderBusy

__all__ = [
    "CheckpointError", "DataConfig", "Job", "RunFolderBusy", "TrainConfig", "Trainer", "TrainingDiverged",
    "latest_checkpoint", "load_train_config", "lr_factor", "train_config_from_dict",
]
