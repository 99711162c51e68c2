#!/usr/bin/env bash
# The dataset for `make run`: data/raw as data.dvc records it. A data/raw that differs from data.dvc
# stops the run with what to do; it and data.dvc are never rewritten here. A missing data/raw comes
# from the DVC remote when one is configured and reachable, otherwise the deterministic synthetic
# default is regenerated (byte-identical, so data.dvc's md5 matches) and put in the DVC cache (so
# `dvc exp run --temp` and `dvc push` find it).
set -euo pipefail

# "missing", "match" or "differs": data/raw against the hash that data.dvc records. `dvc status` cannot
# tell: while the recorded object is not in the cache (a fresh clone) it answers "not in cache" whatever
# data/raw holds. `dvc data status` hashes the workspace and lists a changed output as "uncommitted".
raw_state() {
  if [ ! -d data/raw ] || [ -z "$(ls -A data/raw)" ]; then
    echo missing
    return
  fi
  dvc data status --json | python -c '
import json, sys
uncommitted = json.load(sys.stdin).get("uncommitted", {})
changed = [p for paths in uncommitted.values() for p in paths if p.rstrip("/") == "data/raw"]
print("differs" if changed else "match")
'
}

# 0 when the object data.dvc records is in the DVC cache (`dvc checkout` can restore it).
in_cache() {
  dvc data status --json | python -c '
import json, sys
sys.exit(any(p.rstrip("/") == "data/raw" for p in json.load(sys.stdin).get("not_in_cache", [])))
'
}

state=$(raw_state)
if [ "$state" = differs ]; then
  if in_cache; then
    restore="restore the tracked data with 'dvc checkout data/raw'"
  else
    restore="move your files out of data/raw and rerun 'make data' to regenerate the tracked data"
  fi
  echo "data: data/raw differs from data.dvc (left unchanged); to use it run 'dvc add data/raw'" \
    "(and commit data.dvc), or $restore" >&2
  exit 1
elif [ "$state" = match ]; then
  echo "data: data/raw matches data.dvc"
  # Same hash: this only stores the bytes in the DVC cache; data.dvc keeps its content.
  dvc commit -q -f data.dvc
elif [ -n "$(dvc remote list)" ] && dvc pull -q data.dvc 2>/dev/null; then
  echo "data: pulled from the DVC remote"
else
  echo "data: no reachable DVC remote; regenerating the synthetic default"
  rm -rf data/raw
  chromoseg synth
  if [ "$(raw_state)" = match ]; then
    dvc commit -q -f data.dvc
    echo "data: regenerated data matches data.dvc"
  else
    echo "data: WARNING regenerated data differs from data.dvc; see 'dvc data status'" >&2
  fi
fi
