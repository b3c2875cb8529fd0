"""The files of a run directory, named once; everything that writes or reads one uses these names.

A run directory (``fedlayer run --out DIR``) holds the resolved config, one row per round, the analysis rows,
the model files, the checkpoint and the clients' personal layers (simulation), logs and figures. A compare
directory holds one run directory per strategy and seed, plus the sweep's manifest, tables and report.
"""

from __future__ import annotations

# Written by every run.
CONFIG_RESOLVED = "config.resolved.toml"  # the full config the run used: `--resume` and reruns read it
METRICS = "metrics.jsonl"  # one row per round
SUMMARY = "summary.json"  # status "finished" once the last round is written
LAYERS = "layers.json"  # the shared and personal keys the selector resolved to
LAYERS_BY_ROUND = "layers_by_round.json"  # dynamic sharing (lmc): shared blocks and evidence per round
PARTITION = "partition.json"
PARTITION_PLOT = "partition.png"
INITIAL_MODEL, FINAL_MODEL = "initial_model.pt", "model.pt"
CHECKPOINT = "checkpoint.pt"  # the state after the last complete round
CLIENT_STATE = "clients"  # simulation: personal layers, one folder per partition
FLOWER_LOG = "flower.log"  # Flower's and fedlayer's log, and every traceback
SESSION_FILE = "ray_session.json"  # the private Ray session of a run in progress (or of a killed one)
LOCK_FILE = "fedlayer.lock"  # held by the process writing the run directory
TENSORBOARD = "tensorboard"
DEPLOY = "deploy.json"  # `fedlayer deploy`: the deployment's outcome

# The analysis hook.
BARRIERS, LANDSCAPE = "barriers.csv", "landscape.csv"
ANALYSIS_ERRORS = "analysis_errors.log"

# Figures and tables of one run.
ACCURACY_PLOT = "accuracy.png"
SHARED_BLOCKS_PLOT = "shared_blocks.png"
BARRIER_HEATMAP, BARRIER_FULL = "barrier_heatmap.png", "barrier_full.png"
BARRIER_CUMULATIVE, BARRIER_PREDICTED = "barrier_cumulative.png", "barrier_predicted.png"
PREDICTION_CSV, PREDICTION = "prediction.csv", "prediction.md"

# A compare directory.
SWEEP = "sweep.json"
TABLE_CSV, TABLE = "table.csv", "table.md"
REPORT = "report.md"
BARRIER_HEATMAPS = "barrier_heatmaps.png"

# A grid directory (`fedlayer grid`): one compare directory per setting, the matrix over settings, report.md.
GRID = "grid.json"  # the grid's manifest: settings (name, meaning, overrides, folder), strategies, seeds
GRID_EXPERIMENT = "experiment.toml"  # the grid file's base experiment, without its [grid] table
GRID_SETTINGS = "settings"  # folder of the settings' compare directories
MATRIX_CSV, MATRIX = "matrix.csv", "matrix.md"
MATRIX_PLOT = "matrix.png"
SHARING_PLOT = "sharing.png"  # dynamic sharing per setting beside the best fixed split
