#!/usr/bin/env bash
# Centralized KD methods as one-client runs, 3 seeds each (issue 9's evidence): every run reports
# its own baselines (student without KD, single model, self-training alone, each student alone,
# uniform weighting) as method-reported metrics, tabled by `fedkd sweep` beside the headline.
# Cheapest first; `fedkd sweep` skips results that exist (and resumes unfinished runs), so a
# cut-off queue resumes where it stopped.
#
# Usage: bench/centralized.sh [v1|v2|v2-grid|all]   (default all: v1 results exist, so it runs v2
#        and v2-grid; FEDKD_DATA_DIR must point at the shared data)
#   v1: the v1 experiments (their configs pin the v1 values; results in bench/results/<experiment>/)
#   v2: issue 24's v2 runs (centralized.md "(v2)"), results in bench/results/<experiment>-v2/:
#       seed 0 of every method first, then seeds 1 and 2 (about 5 hours in all)
#   v2-grid: kd's T x alpha table with the v2 teacher, 3 seeds (36 runs, about 1.5 hours: each takes
#       the seed's kd-mnist5k-v2 teacher, so `v2` must have run first)
# One run at a time (a lock serialises two invocations); prefix with `nice -n 19` beside other benchmarks.
# DRY_RUN=1 bench/centralized.sh all: every sweep's plan (labels, seeds done and to run), nothing run.
set -u
FEDKD=${FEDKD:-.venv/bin/fedkd}
WHICH=${1:-all}
STKD_FILES="adbench:6_cardio adbench:2_annthyroid adbench:24_mnist adbench:32_shuttle adbench:30_satellite"

sweep() {  # sweep CONFIG OUT SEEDS [grid/overrides...]: skip a config that does not exist yet;
  local config=$1 out=$2 seeds=$3  # retry twice (a loaded machine sometimes fails `ray start`)
  shift 3
  [ -f "$config" ] || { echo "skip (no config yet): $config" >&2; return 0; }
  for try in 1 2 3; do
    "$FEDKD" sweep "$config" "$@" --seeds "$seeds" --out "$out" --quiet ${DRY_RUN:+--dry-run} && return 0
    echo "sweep failed (try $try): $config $* seeds $seeds" >&2
    [ -z "${DRY_RUN:-}" ] || return 1
    sleep 30
  done
}

v1() {
  for exp in stkd-cardio xtime-etth1 kd-mnist5k mixclap-fsdd betakd-avmnist betakd-avmnist-multiteacher; do
    sweep "configs/experiment/$exp.yaml" "bench/results/$exp" 0,1,2
  done
}

stkd_files() {  # stkd_files SEEDS FILE...: init and warm-up teacher on each file
  local seeds=$1
  shift
  for f in "$@"; do
    sweep configs/experiment/stkd-suite-v2.yaml bench/results/stkd-suite-v2 "$seeds" \
        "data.dataset=$f" method.teacher=init,warmup
  done
}

v2_pass() {  # v2_pass SEEDS: every v2 experiment on SEEDS; every method once before stkd's other files
  local seeds=$1 e=configs/experiment first rest
  first=${STKD_FILES%% *}
  rest=${STKD_FILES#* }
  sweep $e/kd-mnist5k-v2.yaml bench/results/kd-mnist5k-v2 "$seeds"
  sweep $e/kd-mnist5k-s100-v2.yaml bench/results/kd-mnist5k-s100-v2 "$seeds"
  sweep $e/xtime-etth1-v2.yaml bench/results/xtime-etth1-v2 "$seeds"
  stkd_files "$seeds" "$first"
  sweep $e/betakd-avmnist-v2.yaml bench/results/betakd-avmnist-v2 "$seeds" method.weight_lr_mode=official,fixed
  sweep $e/mixclap-fsdd-v2.yaml bench/results/mixclap-fsdd-v2 "$seeds" method.teacher_noise_aug=false,true
  # shellcheck disable=SC2086  # word splitting intended: the other files
  stkd_files "$seeds" $rest
}

v2() {
  v2_pass 0
  v2_pass 0,1,2
}

v2_grid() {  # the T x alpha table with the v2 teacher: every cell distills the teacher that the
  # seed's kd-mnist5k-v2 run trained (method.teacher_from), so no cell retrains it; the first
  # cell, T = 4 and alpha = 0.9, is the seed run itself and must reproduce its results
  local teacher='method.teacher_from=bench/results/kd-mnist5k-v2/kd-mnist5k-v2/seed${experiment.seed}'
  for size in kd-mnist5k-v2 kd-mnist5k-s100-v2; do
    sweep "configs/experiment/$size.yaml" "bench/results/$size-grid" 0,1,2 \
        method.temperature=4,1,2 method.alpha=0.9,0.5 --set "$teacher" --variant shared_teacher
  done
}

if [ -z "${DRY_RUN:-}" ]; then  # DRY_RUN=1: validate every sweep and print its plan, run nothing
  exec 9>"${TMPDIR:-/tmp}/fedkd-centralized-bench.lock"
  flock 9
fi
case "$WHICH" in
  v1) v1 ;;
  v2) v2 ;;
  v2-grid) v2_grid ;;
  all) v1; v2; v2_grid ;;
  *) echo "usage: $0 [v1|v2|v2-grid|all]" >&2; exit 2 ;;
esac
