"""Assembly: a run built from its config (`Experiment`), its config checks, its model.

Above models/, convert/, datasets/, paradigms/ and tasks/; train, evaluate and predict use it,
and nothing below imports it.
"""
from dense_diffusion.experiment.config import check as check_config
from dense_diffusion.experiment.config import load as load_config
from dense_diffusion.experiment.config import save as save_config
from dense_diffusion.experiment.experiment import (BATCH_RANKS, Experiment, TrainState,
                                                   make_optimizer, make_schedule)

__all__ = ["Experiment", "TrainState", "BATCH_RANKS", "check_config", "load_config",
           "save_config", "make_optimizer", "make_schedule"]
