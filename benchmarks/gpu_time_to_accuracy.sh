#!/usr/bin/env bash
# Time to accuracy on a GPU, start to finish:
#
#     benchmarks/gpu_time_to_accuracy.sh DATA_DIR OUT_DIR [MINUTES] [CONFIG] [KEY=VALUE ...]
#
# KEY=VALUE arguments override the config (as `cerberus train --set`) in the probe and the run;
# the script's own train.test_every_epoch=true and (unless MINUTES = 0) train.epochs win over them.
# Run it from the repository root.
# 1. benchmarks/bench_gpu.py measures the config's training loop here and how many epochs fit
#    MINUTES (default 5) of training, one test evaluation per epoch included; MINUTES = 0 skips
#    this and keeps the config's epochs;
# 2. `cerberus train CONFIG` runs that many epochs with the test curve on (a curve only: best.pt
#    is chosen as the config says), its events as JSON lines in OUT_DIR/train.jsonl, its run
#    directory in a new temporary folder (printed);
# 3. `cerberus eval best.pt --tta` adds the flip-and-shift test-time augmentation figure.
# OUT_DIR gets probe.txt (unless MINUTES = 0), train.jsonl, eval_tta.json and the run's metrics.jsonl, summary.json
# and curves.png. PYTHON picks the interpreter (default python3).
set -euo pipefail
data=$1
out=$2
minutes=${3:-5}
config=${4:-configs/resnet24.toml}
sets=("${@:5}")  # expanded as ${sets[@]+"${sets[@]}"}: bash before 4.4 calls an empty array unset
py=${PYTHON:-python3}
mkdir -p "$out"
run=$(mktemp -d)/run

overrides=(${sets[@]+"${sets[@]}"} train.test_every_epoch=true)
if [ "$minutes" != 0 ]; then
    $py benchmarks/bench_gpu.py "$config" --data-dir "$data" --minutes "$minutes" --set ${sets[@]+"${sets[@]}"} | tee "$out/probe.txt"
    epochs=$(tail -n 1 "$out/probe.txt" | $py -c 'import json, sys; print(json.load(sys.stdin)["epochs"])')
    overrides+=("train.epochs=$epochs")
fi
echo "training $config (${overrides[*]}) in $run"
$py -m cerberus train "$config" --data-dir "$data" --out "$run" --json --set "${overrides[@]}" >"$out/train.jsonl"
tail -n 1 "$out/train.jsonl"
$py -m cerberus eval "$run/best.pt" --data-dir "$data" --tta --json | tee "$out/eval_tta.json"
cp "$run/metrics.jsonl" "$run/summary.json" "$run/curves.png" "$out/"
