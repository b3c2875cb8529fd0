#!/usr/bin/env bash
# Re-creates experiments/results/ at CPU scale (2 cores: about 60 minutes in all). Large files (models,
# checkpoints, client states, logs) are removed afterwards; metrics, barrier tables and plots stay.
set -euo pipefail
cd "$(dirname "$0")/.."
FL=.venv/bin/fedlayer
R=experiments/results
export FLWR_TELEMETRY_ENABLED=0
for name in llmc_fig1_fmnist llmc_cumulative_fmnist random_control; do
  $FL run "experiments/$name.toml" --out "$R/$name" --overwrite
done
$FL compare experiments/llmc_fl_groups.toml --seeds 0,1 --out "$R/llmc_fl_groups" \
  --strategies 'fedavg,local,partial[conv1],partial[conv2+fc1],partial[fc2],partial[conv1+conv2+fc1]'
$FL compare experiments/llmc_fl_groups.toml --seeds 0,1 --out "$R/llmc_fl_groups_pathological" \
  --strategies 'fedavg,local,partial[conv1+conv2+fc1]' --set "data.partitioner='pathological'"
$FL compare experiments/pfllib_fmnist.toml --seeds 0,1 --out "$R/pfllib_fmnist" \
  --strategies fedavg,fedper,lgfedavg,fedrep,fedbabu,local --set data.max_samples=6000 --set federation.rounds=5
find "$R" -type f \( -name '*.pt' -o -name '*.log' \) -delete
find "$R" -type d \( -name clients -o -name tensorboard \) -prune -exec rm -rf {} +
