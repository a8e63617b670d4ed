#!/bin/bash
# Submit `llama-pretrain data prepare` to Slurm: one job array per stage, each starting when the
# one before it succeeded (--dependency=afterok). OUT must be on a file system every node sees.
#
#   examples/slurm/submit.sh CONFIG TOKENIZER OUT TASKS [sbatch options, e.g. --partition=cpu]
#
# A task that fails (or a node that dies) fails its array job, and the later stages are cancelled
# (--kill-on-invalid-dep=yes; without it they would stay pending for ever, DependencyNeverSatisfied).
# Re-run this script: every item already done is skipped, so only the failed work is redone.
# PREPARE_ARGS="--unit-bytes 1G --range-docs 131072" passes the same data prepare options to every
# stage (they must not differ between stages).
# With LOCAL=1 no Slurm is needed: each array's tasks run here as processes, side by side, with
# the variables Slurm would set (this is how the tests run the recipe).
set -euo pipefail
if [ $# -lt 4 ]; then
    echo "usage: $0 CONFIG TOKENIZER OUT TASKS [sbatch options]" >&2
    exit 2
fi
cfg=$1 tok=$2 out=$3 tasks=$4
shift 4
here=$(cd "$(dirname "$0")" && pwd)
dep=""
for stage in units keys dedup resolve split plan write finish; do
    case $stage in resolve|plan|finish) n=1 ;; *) n=$tasks ;; esac
    if [ "${LOCAL:-0}" = 1 ]; then
        pids=()
        for ((i = 0; i < n; i++)); do
            SLURM_ARRAY_TASK_ID=$i SLURM_ARRAY_TASK_COUNT=$n bash "$here/stage.sbatch" "$stage" "$cfg" "$tok" "$out" ${PREPARE_ARGS:-} &
            pids+=($!)
        done
        for pid in "${pids[@]}"; do
            wait "$pid" || { echo "stage $stage failed; fix the cause and run this again" >&2; exit 1; }
        done
        echo "stage $stage: $n task(s) done"
    else
        dep=$(sbatch --parsable --array=0-$((n - 1)) ${dep:+--dependency=afterok:$dep --kill-on-invalid-dep=yes} \
              --job-name="prepare-$stage" "$@" "$here/stage.sbatch" "$stage" "$cfg" "$tok" "$out" ${PREPARE_ARGS:-})
        echo "stage $stage: job $dep ($n task(s))"
    fi
done
