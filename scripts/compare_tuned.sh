#!/usr/bin/env bash
# The README's tuned comparison: each method's settings chosen by an Optuna search on held-out
# training rows (the validation overall), then 3 seeds at the chosen settings scored on dev,
# then one summary of those runs. The sizes are compare_demo.sh's (16 adapter ranks per adapted
# Linear: equal trainable parameters), so the ranks stay fixed; everything else in the method's
# configs/hparams_search preset is searched (learning rate, alpha, the method's own keys).
#
#   bash scripts/compare_tuned.sh [OUT] [LANES]
#   TRIALS=20 SEARCH_STEPS=600 METHODS="lora moelora" EXTRA="hardware=gpu" bash scripts/compare_tuned.sh
#
# TRIALS (20), SEARCH_STEPS (600: the final runs' steps) and METHODS (all six) are the defaults;
# EXTRA holds overrides for every run.
# OUT defaults to runs/compare_tuned: OUT/search/<method> holds each search (its summary.md
# names the best trial), OUT/tuned/<method> the seeds' runs, OUT/chosen.md the chosen settings,
# OUT/summary.md the comparison. LANES=2 runs the methods in two lanes of one CPU thread each.
# The final runs train on all training rows, as compare_demo.sh's do (the searches held 10 % out).
# Rerunning the same command continues where it stopped: a search resumes its study (its
# hydra.sweep.dir is fixed; a larger TRIALS adds trials) and finished seeds are skipped
# (trainer.resume=auto); seeds trained at settings the search no longer chooses stop the script.
set -euo pipefail
out=${1:-runs/compare_tuned}
lanes=${2:-1}
trials=${TRIALS:-20}
search_steps=${SEARCH_STEPS:-600}
read -r -a methods <<< "${METHODS:-lora moelora molora contrastive modula modula_res}"
read -r -a extra <<< "${EXTRA:-}"
all='[q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj]'

sizes() {  # compare_demo.sh's sizes: fixed, so they leave the search space
  case $1 in
    lora) echo method.rank_per_expert=16 ;;
    moelora) echo method.total_rank=16 ;;
    molora) echo method.rank_per_expert=6 ;;
    contrastive) echo "method.target_modules=$all method.total_rank=16" ;;
    modula | modula_res) echo method.universal_rank=8 method.domain_rank=2 method.scaling_rank=total ;;
  esac
}

best() {  # the best trial's settings as overrides (the plugin's optimization_results.yaml)
  python - "$out/search/$1/optimization_results.yaml" <<'EOF'
import sys
from omegaconf import OmegaConf
print(" ".join(f"{k}={v}" for k, v in OmegaConf.load(sys.argv[1]).best_params.items()))
EOF
}

tune() {  # search, then three seeds at the best settings
  local name=$1
  # shellcheck disable=SC2046
  moelora train -m hydra/sweeper=optuna +experiment=demo "method=$name" $(sizes "$name") "${extra[@]}" \
    "hydra.sweeper.n_trials=$trials" "trainer.max_steps=$search_steps" \
    "hydra.sweep.dir=$out/search/$name" > "$out/search_$name.log" 2>&1
  local chosen seeds=$out/tuned/$name
  chosen=$(best "$name")
  echo "$name: searched ($(date +%T)): $chosen"
  mkdir -p "$seeds"
  if [[ -f $seeds/chosen.txt && $(< "$seeds/chosen.txt") != "$chosen" ]]; then
    echo "$name: the search now chooses $chosen, but $seeds trained $(< "$seeds/chosen.txt");" \
      "move $seeds away to train the new choice." >&2
    return 1
  fi
  echo "$chosen" > "$seeds/chosen.txt"
  # shellcheck disable=SC2086
  moelora train -m +experiment=demo "method=$name" $(sizes "$name") "${extra[@]}" $chosen \
    trainer.seed=0,1,2 trainer.resume=auto "hydra.sweep.dir=$seeds" > "$out/tuned_$name.log" 2>&1
  echo "$name: done ($(date +%T))"
}

lane() {  # every LANES-th method from the given offset
  local i
  for ((i = $1; i < ${#methods[@]}; i += lanes)); do tune "${methods[$i]}"; done
}

mkdir -p "$out"
if [[ $lanes == 2 ]]; then
  OMP_NUM_THREADS=1 lane 0 &
  a=$!
  OMP_NUM_THREADS=1 lane 1 &
  b=$!
  wait $a
  wait $b
else
  lane 0
fi
{
  echo "| method | best trial | validation | chosen settings |"
  echo "|---|---|---|---|"
  for name in "${methods[@]}"; do
    python - "$out/search/$name/optimization_results.yaml" "$name" <<'EOF'
import sys
from omegaconf import OmegaConf
r = OmegaConf.load(sys.argv[1])
done = sum(t.state == "COMPLETE" for t in r.trials)
settings = ", ".join(f"{k}={v:.2e}" if isinstance(v, float) else f"{k}={v}" for k, v in r.best_params.items())
print(f"| {sys.argv[2]} | {r.best_trial} of {done} | {100 * r.best_value:.1f} | {settings} |")
EOF
  done
} > "$out/chosen.md"
# the baseline: the fewest trainable parameters, lora (its label holds its chosen settings)
moelora compare "${methods[@]/#/$out/tuned/}" --out "$out"
