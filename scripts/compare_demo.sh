#!/usr/bin/env bash
# The README's method comparison: every method on the demo, 3 seeds each, at equal trainable
# parameters (16 adapter ranks per adapted Linear: about 262,144 adapter weights on the demo base;
# gates and routers come on top), then one summary of all runs.
#
#   bash scripts/compare_demo.sh [OUT] [LANES]
#
# OUT defaults to runs/compare_demo. LANES=2 runs the methods in two lanes side by side, one CPU
# thread each (the demo's small matrices use a second thread poorly): about 50 minutes on 2 cores
# instead of about 75 for one lane. Each method keeps its paper's layout; only the sizes are set,
# and alpha so that every expert's scale s is 2 (lora's alpha 32 / rank 16): s multiplies an
# expert's step size, and alpha 32 over a rank-2 expert (s = 16) collapses it (BENCHMARKS.md).
#   lora         rank 16 on every Linear
#   moelora      8 experts x rank 2 (total 16), one task-motivated gate, s = 32 / 16
#   molora       MING-MOE's layout: dense LoRA rank 6 on attention, 4 experts x rank 6 on the
#                MLP, top-2 (4 layers x (1,792 x 6 + 2,304 x 24) = 264,192), s = 12 / 6
#   contrastive  4 experts x rank 4 (total 16) on every Linear, top-2, s = 32 / 16
#   modula(_res) universal rank 8 + 4 domain experts x rank 2, the preset's three stages,
#                s = 20 / (8 + 2) for every expert
set -euo pipefail
out=${1:-runs/compare_demo}
lanes=${2:-1}
all='[q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj]'

sweep() {  # one method, three seeds: a Hydra multirun into $out/<method>
  local name=$1
  shift
  moelora train -m +experiment=demo "method=$name" "$@" trainer.seed=0,1,2 \
    "hydra.sweep.dir=$out/$name" > "$out/$name.log" 2>&1
  echo "$name: done ($(date +%T))"
}
lane_a() {
  sweep lora method.rank_per_expert=16
  sweep moelora method.total_rank=16
  sweep molora method.rank_per_expert=6 method.alpha=12
  sweep contrastive "method.target_modules=$all" method.total_rank=16
}
lane_b() {
  local sizes=(method.universal_rank=8 method.domain_rank=2 method.scaling_rank=total method.alpha=20)
  sweep modula "${sizes[@]}"
  sweep modula_res "${sizes[@]}"
}

mkdir -p "$out"
if [[ $lanes == 2 ]]; then
  OMP_NUM_THREADS=1 lane_a &
  a=$!
  OMP_NUM_THREADS=1 lane_b &
  b=$!
  wait $a
  wait $b
else
  lane_a
  lane_b
fi
sweeps=("$out"/*/multirun.yaml)  # the folders the sweeps above wrote
moelora compare "${sweeps[@]%/multirun.yaml}" --out "$out" --baseline method=lora
