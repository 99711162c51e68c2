#!/bin/bash
# One point of the quality-per-compute frontier (BENCHMARKS.md): train with params.yaml plus the given
# overrides in a scratch folder on this project's prepared data, then score the checkpoint on the test
# split and on real-dev with scripts/frontier_score.py.
#   scripts/frontier_screen.sh NAME section.key=value ...     e.g.  I train.crop=64 train.epochs=13
# Env: FRONTIER_DIR (scratch root, default /tmp/chromoseg-frontier), VIEWS (real-dev views, default
# 1,4,8), TVIEWS (test-split views, default 1), CPUS (taskset list, default: all).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
name=$1; shift
d=${FRONTIER_DIR:-/tmp/chromoseg-frontier}/$name
mkdir -p "$d/data" && cd "$d"
ln -sfn "$root/data/prepared" data/prepared
python - "$root/params.yaml" "$@" <<'PY'
import sys, yaml
p = yaml.safe_load(open(sys.argv[1]))
for kv in sys.argv[2:]:
    k, v = kv.split("=", 1)
    sec, key = k.split(".")
    p[sec][key] = yaml.safe_load(v)
yaml.safe_dump(p, open("params.yaml", "w"), sort_keys=False)
PY
run() { if [ -n "${CPUS:-}" ]; then taskset -c "$CPUS" "$@"; else "$@"; fi; }
run chromoseg train > train.log 2>&1
run python "$root/scripts/frontier_score.py" models/model.pt views.json \
  "${VIEWS:-1,4,8}" "${TVIEWS:-1}" "$root/data/prepared" "$root/../shared/data/real-dev/labelme" > score.log 2>&1
tail -1 train.log; cat views.json
