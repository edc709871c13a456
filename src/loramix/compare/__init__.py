"""``loramix compare``: fair comparisons of adapter methods, with seeds and confidence intervals.

A study (``study.py``) trains every (method, seed) with the same data and budget and scores every run on
the same questions (``runner.py``, resumable, ``--jobs N``); ``stats.py`` gives the t intervals and the
paired bootstrap; ``report.py`` writes results.json, results.md and results.png.

Example:
    >>> from loramix.compare import run_study
    >>> run_study("examples/compare.yaml", jobs=1)["results"]     # PosixPath('results/compare/results.json')
"""

from .runner import StudyInterrupted, execute_run, run_study
from .stats import paired_bootstrap, t_interval
from .study import StudyConfig, load_study, study_from_dict

__all__ = ["StudyConfig", "StudyInterrupted", "execute_run", "load_study", "paired_bootstrap", "run_study",
           "study_from_dict", "t_interval"]
