"""thermo: thermometers, divergence detection and rollback-and-skip for large-model training."""

__version__ = "0.1.0"

from thermo.store import Run, StepRecord, Store, load  # noqa: E402
from thermo.thermometer import Thermometer, ThermometerConfig  # noqa: E402

__all__ = ["Run", "StepRecord", "Store", "Thermometer", "ThermometerConfig", "load", "__version__"]
