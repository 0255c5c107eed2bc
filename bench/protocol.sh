#!/usr/bin/env bash
# Every method on the benchmark protocol's settings, most informative runs first (seed 0 on
# std-mnist, then std-fmnist, then std-cifar10's PSE comparison, then std-mnist seeds 1-2). `fedkd sweep` skips results that exist,
# so a cut-off queue resumes where it stopped; one sweep failing does not stop the others.
# Usage: bench/protocol.sh   (FEDKD_DATA_DIR must point at the shared data; the Makefile sets it)
set -u
FEDKD=${FEDKD:-.venv/bin/fedkd}
PFL=local,fedavg,fedprox,fedper,fedrep,lgfedavg,ditto
KD=fedntd,fml,feddistill,fedproto,fedkd_mentor
OURS=pse  # mhpflid on one shared CNN is not in the protocol tables; its heterogeneous run is below
sweep() { "$FEDKD" sweep "$@" --quiet || echo "sweep failed: $*" >&2; }
for setting in "mnist --seeds 0" "fmnist --seeds 0" "mnist --seeds 0,1,2"; do
  set -- $setting
  name=$1 cfg=configs/experiment/std-$1.yaml out=bench/results/std-$1; shift
  sweep "$cfg" method.name=$PFL "$@" --out "$out"
  sweep "$cfg" method.name=fedbn,fedavg model.name=cnn_bn "$@" --out "$out"
  sweep "$cfg" method.name=$KD "$@" --out "$out"
  sweep "$cfg" method.name=fedkd_mentor method.compress=true "$@" --out "$out"
  sweep "$cfg" method.name=$OURS "$@" --out "$out"
  [ -f "configs/experiment/std-$name-mhpflid.yaml" ] && sweep "configs/experiment/std-$name-mhpflid.yaml" \
      method.name=mhpflid,local "$@" --out "$out" --variant hetero
  if [ "$name" = fmnist ]; then  # std-cifar10 (10 clients, 5k images): PSE vs baselines, CNN and small ResNet
    sweep configs/experiment/std-cifar10.yaml method.name=fedavg,local,fedrep,ditto,pse --seeds 0 --out bench/results/std-cifar10
    sweep configs/experiment/std-cifar10.yaml method.name=fedavg,local,fedrep,ditto,pse model.name=resnet8 --seeds 0 \
        --out bench/results/std-cifar10
  fi
done
