"""Latency on a target: time every candidate, build the lookup table, predict a network.

Targets (one file each, `base.Target`), the timing protocol (protocol.py), whole networks
against the teacher (compare.py), the table's measurement (table.py) and what it predicts
(model.py).

    >>> from hant import latency
    >>> t = latency.get_target("onnxruntime-cpu", batch_size=1)
    >>> stats = latency.measure_modules([("conv", conv, (16, 32, 32))], t)
    >>> table = latency.measure_table("runs/a", target="onnxruntime-cpu", batch_size=1, validate=20)
    >>> latency.predict_ms(table, {"blocks.1.0": "mb_k3_e3_relu", ...})

Targets: onnxruntime-cpu, onnxruntime-cpu-int8, torch-cpu, torch-cuda, analytic; register
your own with `register_target`.
"""

from hant.latency.base import Target, available_cores, cpu_model, fold_batchnorm, get_target, register_target, target_ids
from hant.latency.model import entry_costs, load_table, predict_ms, table_id, table_path
from hant.latency.protocol import Protocol, Stats, measure, measure_modules
from hant.latency.table import build_network, covers_pools, measure_table, validate_table

__all__ = [
    "covers_pools",
    "Target",
    "Protocol",
    "Stats",
    "available_cores",
    "build_network",
    "cpu_model",
    "entry_costs",
    "fold_batchnorm",
    "get_target",
    "load_table",
    "measure",
    "measure_modules",
    "measure_table",
    "predict_ms",
    "register_target",
    "table_id",
    "table_path",
    "target_ids",
    "validate_table",
]
