"""The paper's experiments as a tool: task presets, comparison arms, the runner, results and plots.

``hf-camhd compare`` (:mod:`hf_camhd.cli`) is the command-line face of :func:`run_comparison`.

Example:
    >>> from hf_camhd.experiments import CompareConfig, list_tasks, resolve_arm
    >>> "lenet5-cifar10" in list_tasks(), resolve_arm("adam-camhd-3level").display_name
    (True, 'Adam-CAM-HD (3-level)')
"""

from .arms import Arm, arm_hyperparameters, arm_names, build_optimizer, resolve_arm
from .presets import DEFAULT_TASK, SWEEP_GAMMAS, SWEEP_HYPERGRAD_LRS, TASKS, TaskPreset, get_task, list_tasks
from .results import load_results, render_markdown, summarize, summarize_hypergrad_sweep, summarize_sweep

_RUNNER = ("CompareConfig", "CompareSummary", "RunSpec", "plan_runs", "resolve_task", "run_comparison")


def __getattr__(name: str):
    # note: the runner (accelerate, datasets, evaluate, ...) loads on first use, so `hf-camhd --help` and the
    # presets / arms / results stay light
    if name in _RUNNER:
        from . import runner

        return getattr(runner, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "Arm",
    "CompareConfig",
    "CompareSummary",
    "DEFAULT_TASK",
    "RunSpec",
    "SWEEP_GAMMAS",
    "SWEEP_HYPERGRAD_LRS",
    "TASKS",
    "TaskPreset",
    "arm_hyperparameters",
    "arm_names",
    "build_optimizer",
    "get_task",
    "list_tasks",
    "load_results",
    "plan_runs",
    "render_markdown",
    "resolve_arm",
    "resolve_task",
    "run_comparison",
    "summarize",
    "summarize_hypergrad_sweep",
    "summarize_sweep",
]
