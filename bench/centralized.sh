#!/usr/bin/env bash
# Centralized KD methods as one-client runs, 3 seeds each (issue 9's evidence): every run reports
# its own baselines (student without KD, single model, self-training alone, each student alone,
# uniform weighting) as method-reported metrics, tabled by `fedkd sweep` beside the headline.
# Cheapest first; `fedkd sweep` skips results that exist, so a cut-off queue resumes.
# Usage: bench/centralized.sh   (FEDKD_DATA_DIR must point at the shared data)
set -u
FEDKD=${FEDKD:-.venv/bin/fedkd}
for exp in stkd-cardio xtime-etth1 kd-mnist5k mixclap-fsdd betakd-avmnist betakd-avmnist-multiteacher; do
  "$FEDKD" sweep "configs/experiment/$exp.yaml" --seeds 0,1,2 --out "bench/results/$exp" --quiet \
      || echo "sweep failed: $exp" >&2
done
