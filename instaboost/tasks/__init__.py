"""Tasks a run can perform, by the name in `cfg.task`."""
from instaboost.tasks.train import train

TASKS = {"train": train}
