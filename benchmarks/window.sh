#!/usr/bin/env bash
# Ours against anomalib 2.7's PaDiM on fryum, in one window of the machine, one after the other:
# ours twice, anomalib once, twice over, then ours once more (the ratio to report: median against
# median). Ours at anomalib's settings with its image score (the max of the map).
#
#   benchmarks/window.sh [ANOMALIB_PYTHON] [PREPARED_FOLDER] [-- extra padim run options]
#
# ANOMALIB_PYTHON (default /tmp/anomvenv/bin/python) and PREPARED_FOLDER (default /tmp/fryum_mv):
# see benchmarks/anomalib_padim.py for how to make them. Run it from a checkout that nothing edits
# while it runs.
set -euo pipefail
cd "$(dirname "$0")/.."
ANOMALIB=/tmp/anomvenv/bin/python
PREPARED=/tmp/fryum_mv
if [ $# -gt 0 ] && [ "$1" != "--" ]; then ANOMALIB=$1; shift; fi
if [ $# -gt 0 ] && [ "$1" != "--" ]; then PREPARED=$1; shift; fi
if [ $# -gt 0 ] && [ "$1" = "--" ]; then shift; fi
PYTHON=${PYTHON:-.venv/bin/python}
ours() {
  "$PYTHON" benchmarks/stages.py --datasets fryum -- --image-size 256 --aspect square --d 100 --scales 1 \
    --pool 1 --image-score map "$@" 2>&1 | grep "fryum:"
}
for i in 1 2; do
  ours "$@"; ours "$@"
  rm -rf "$PREPARED/results"
  start=$(date +%s.%N)
  "$ANOMALIB" benchmarks/anomalib_padim.py run "$PREPARED" > /dev/null 2>&1
  echo "anomalib run $i: $(echo "$(date +%s.%N) - $start" | bc) s wall"
done
ours "$@"
