"""Sinks: where flushed records go besides the store, for the tools people already watch.

========================  =====================================================================
`WandbSink`               Weights & Biases (extra ``wandb``): never stalls training, shares a
                          run without dropping its rows, alerts on verdicts
`TensorBoardSink`         TensorBoard (extra ``tensorboard``)
`KeyBudget`               which keys they log per step (scalars, per-block aggregates, the
                          hottest layers; at most 100) and the full table at flushes
`workspace`               the W&B workspace for those keys:
                          ``python -m thermo.sinks.workspace ENTITY/PROJECT``
========================  =====================================================================

A sink is anything with ``write(records)`` and ``close()`` (`thermo.thermometer.Sink`); the
thermometer calls it on rank 0 at every flush.
"""

from thermo.sinks.budget import KeyBudget, StepAxis
from thermo.sinks.tensorboard_sink import TensorBoardSink
from thermo.sinks.wandb_sink import WandbSink

__all__ = ["KeyBudget", "StepAxis", "TensorBoardSink", "WandbSink"]
