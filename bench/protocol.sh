#!/usr/bin/env bash
# Every method on the benchmark protocol's settings, the issues' headline comparisons first:
#   1. std-mnist seed 0, every method;  2. std-cifar10 seed 0 (PSE vs baselines: CNN, PSE ablations, resnet8);
#   3. std-fmnist seed 0 and std-mnist seeds 1-2, headline methods (PSE, FedAvg, local, FedRep, Ditto;
#      MH-pFLID vs local on heterogeneous models);  4. the remaining methods on those settings, PSE's
#      ablations on std-mnist.
# `fedkd sweep` skips results that exist, so a cut-off queue resumes where it stopped; one sweep
# failing does not stop the others.
# Usage: bench/protocol.sh   (FEDKD_DATA_DIR must point at the shared data; the Makefile sets it)
set -u
FEDKD=${FEDKD:-.venv/bin/fedkd}
HEADLINE=pse,fedavg,local,fedrep,ditto
PFL=fedprox,fedper,lgfedavg
KD=fedntd,fml,feddistill,fedproto,fedkd_mentor
sweep() { "$FEDKD" sweep "$@" --quiet || echo "sweep failed: $*" >&2; }
headline() {  # headline SETTING SEEDS
  local out=bench/results/std-$1 hetero=configs/experiment/std-$1-mhpflid.yaml
  sweep "configs/experiment/std-$1.yaml" method.name=$HEADLINE --seeds "$2" --out "$out"
  [ -f "$hetero" ] && sweep "$hetero" method.name=mhpflid,local --seeds "$2" --out "$out" --variant hetero
}
others() {  # others SETTING SEEDS
  local cfg=configs/experiment/std-$1.yaml out=bench/results/std-$1
  sweep "$cfg" method.name=$PFL --seeds "$2" --out "$out"
  sweep "$cfg" method.name=fedbn,fedavg model.name=cnn_bn --seeds "$2" --out "$out"
  sweep "$cfg" method.name=$KD --seeds "$2" --out "$out"
  sweep "$cfg" method.name=fedkd_mentor method.compress=true --seeds "$2" --out "$out"
  sweep "$cfg" method.name=fedkd_mentor method.compress=true method.share=update --seeds "$2" --out "$out"
}
cifar10() {  # cifar10 MODEL: 10 clients, 5k colour images; PSE's excitation must show there too
  sweep configs/experiment/std-cifar10.yaml method.name=$HEADLINE model.name=$1 --seeds 0 \
      --out bench/results/std-cifar10
}
pse_ablations() {  # pse_ablations SETTING [axis ...]: which half of PSE carries the result (issue 6)
  local setting=$1; shift
  sweep "configs/experiment/std-$setting.yaml" method.name=pse "$@" --set method.excitation=false \
      --variant attention_only --seeds 0 --out "bench/results/std-$setting"
  sweep "configs/experiment/std-$setting.yaml" method.name=pse "$@" --set method.attention=false \
      --variant excitation_only --seeds 0 --out "bench/results/std-$setting"
}
headline mnist 0; others mnist 0
cifar10 cnn; pse_ablations cifar10 model.name=cnn; cifar10 resnet8
headline fmnist 0; headline mnist 0,1,2
others fmnist 0; others mnist 0,1,2; pse_ablations mnist
