"""mtbert: multitask fine-tuning of BERT, one config choice per idea of the study."""

import logging

from omegaconf import OmegaConf

from mtbert.memory import limit_kernel_caches
from mtbert.threads import choose_wait_policy

# before torch loads OpenMP: passive waiting when other processes keep the cores busy
choose_wait_policy()
# before mtbert makes its first oneDNN kernel: bounded kernel caches
limit_kernel_caches()

# `resume=RUN_DIR` continues a run in its own directory; Hydra writes that job's record
# to `.hydra-resume/` so the original `.hydra/` (the run's config) stays as it was.
OmegaConf.register_new_resolver(
    "mtbert.run_dir", lambda resume, default: resume or default, replace=True)
OmegaConf.register_new_resolver(
    "mtbert.hydra_subdir", lambda resume: ".hydra-resume" if resume else ".hydra", replace=True)


def console_logging():
    """The command-line tools log as a training run does (Hydra's format), mtbert's own
    progress lines at INFO and other libraries' at WARNING."""
    logging.basicConfig(level=logging.WARNING, format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")
    logging.getLogger("mtbert").setLevel(logging.INFO)
