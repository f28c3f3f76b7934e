"""thermo: thermometers, divergence detection and rollback-and-skip for large-model training.

Names are imported on first use, so ``import thermo`` (and the ``thermo`` command line) does
not pay for torch, pandas or plotly until something needs them.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

_EXPORTS = {
    "Thermometer": "thermo.thermometer",
    "ThermometerConfig": "thermo.thermometer",
    "RunDir": "thermo.rundir",
    "Store": "thermo.store",
    "StepRecord": "thermo.store",
    "Run": "thermo.store",
    "load": "thermo.store",
    "Detector": "thermo.detector",
    "DetectorConfig": "thermo.detector",
    "Verdict": "thermo.detector",
    "detect_run": "thermo.detector",
    "Guard": "thermo.guard",
    "GuardConfig": "thermo.guard",
    "DivergenceError": "thermo.guard",
    "EXIT_DIVERGED": "thermo.guard",
    "EXIT_PREEMPTED": "thermo.guard",
    "Preempted": "thermo.guard",
    "Checkpoints": "thermo.checkpoints",
    "CheckpointConfig": "thermo.checkpoints",
    "Blacklist": "thermo.data",
    "ResumableSampler": "thermo.data",
    "StatefulLoader": "thermo.data",
    "BatchLedger": "thermo.data",
    "Watch": "thermo.guard",
    "Supervisor": "thermo.supervisor",
    "SupervisorConfig": "thermo.supervisor",
    "WandbSink": "thermo.sinks",
    "TensorBoardSink": "thermo.sinks",
}

__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'thermo' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(__all__)


if TYPE_CHECKING:  # for type checkers and IDEs
    from thermo.checkpoints import CheckpointConfig, Checkpoints
    from thermo.data import BatchLedger, Blacklist, ResumableSampler, StatefulLoader
    from thermo.detector import Detector, DetectorConfig, Verdict, detect_run
    from thermo.guard import EXIT_DIVERGED, EXIT_PREEMPTED, DivergenceError, Guard, GuardConfig, Preempted, Watch
    from thermo.rundir import RunDir
    from thermo.sinks import TensorBoardSink, WandbSink
    from thermo.supervisor import Supervisor, SupervisorConfig
    from thermo.store import Run, StepRecord, Store, load
    from thermo.thermometer import Thermometer, ThermometerConfig
