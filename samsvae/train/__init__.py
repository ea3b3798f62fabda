"""The minimal trainer: one ``fit`` pipeline, the loop and its callbacks, atomic checkpoints,
exact resume, run directories, torchrun."""
from .checkpoint import (
    atomic_torch_save,
    capture_rng_state,
    load_checkpoint,
    restore_rng_state,
)
from .config import TrainConfig, default_max_epochs
from .fit import fit
from .run_dir import (
    LoadedRun,
    align_screen,
    load_run,
    read_config,
    run_config,
    save_run,
)
from .trainer import Trainer

__all__ = [
    "fit", "Trainer", "TrainConfig", "default_max_epochs", "LoadedRun", "load_run", "save_run",
    "run_config", "read_config", "align_screen", "atomic_torch_save", "load_checkpoint",
    "capture_rng_state", "restore_rng_state",
]
