#!/bin/bash
# Sweep throughput with one GPU per joblib worker (issue 11), in one call on a two-GPU machine: the same
# Optuna sweep (same sampler seed, so the same trials) with one worker on GPU 0, then with two workers on
# GPUs 0 and 1 (`hydra.sweeper.devices=[0,1]`), each in a fresh study; the table gives trials per hour. A
# warm-up sweep of the same trials runs first, unreported, so that both measured sweeps find the tokenized data
# and MLX's compiled kernels cached (the first sweep on a fresh machine would otherwise pay for both).
#   source benchmarks/gpu/setup_mlx_cuda.sh WHEELS_DIR [PARTS...] && bash benchmarks/gpu/run_sweep_devices.sh
# Writes $OUT/sweep_devices.txt (the table) and $OUT/sweep_log.txt. Each trial is the flagship experiment on
# the 7B shape (random weights, the embedded Dolly sample, STEPS optimizer steps), W&B off, no sample answers.
# Dry run on a CPU: EXTRA="experiment=tiny_dolly_sample model=tiny" TRIALS=2 STEPS=2 bash benchmarks/gpu/run_sweep_devices.sh
OUT=${OUT:-/tmp/bench_out}
mkdir -p "$OUT"
TRIALS=${TRIALS:-4}
STEPS=${STEPS:-12}
EXTRA=${EXTRA:-experiment=mistral7b_dolly_qlora model=mistral-7b-shape}
ROOT=$(mktemp -d)
sweep() {  # sweep NAME WORKERS DEVICES: one sweep, its wall seconds on stdout
  local name=$1 workers=$2 devices=$3 start end
  start=$(date +%s.%N)
  timeout ${LIMIT:-280} python3 -m harness.train -m hparams_search=dolly_optuna hparams_search/pruner=none \
    $EXTRA data=dolly_sample data.max_records=null logger=none hydra/launcher=joblib_local \
    trainer.max_steps=$STEPS trainer.eval_every=$STEPS trainer.max_eval_examples=64 \
    trainer.num_sample_prompts=0 trainer.progress=false \
    hydra.sweeper.study_name=$name hydra.sweeper.n_trials=$TRIALS hydra.sweeper.n_jobs=$workers \
    hydra.launcher.n_jobs=$workers "hydra.sweeper.devices=$devices" \
    "hydra.sweeper.device_lock_dir=$ROOT/locks-$name" paths.multirun=$ROOT/$name >>"$OUT/sweep_log.txt" 2>&1
  local status=$?
  end=$(date +%s.%N)
  echo "$name $workers $devices $status $(python3 -c "print(round($end - $start, 1))")"
}
{
  sweep warmup 2 [0,1] >/dev/null
  echo "sweep | workers | devices | exit | seconds | trials | trials/hour"
  for spec in "one_gpu 1 [0]" "two_gpus 2 [0,1]"; do
    read -r name workers devices status seconds < <(sweep $spec)
    done=$(python3 - "$ROOT/$name/optuna.db" "$name" <<'PY'
import sys, optuna
study = optuna.load_study(study_name=sys.argv[2], storage=f"sqlite:///{sys.argv[1]}")
print(sum(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials))
PY
)
    echo "$name | $workers | $devices | $status | $seconds | $done | $(python3 -c "print(round($done * 3600 / $seconds))")"
  done
} | tee "$OUT/sweep_devices.txt"
grep -h "sweep worker" "$OUT/sweep_log.txt" | sort | uniq -c | head
