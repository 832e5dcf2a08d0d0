#!/bin/sh
# Plain-shell CI gate (GitLab, Jenkins, Buildkite, cron): run the pipeline, gate on its budgets, and
# optionally compare with a baseline report. JUnit XML for the CI's test view goes to ci-results/.
#
#   deploy/ci/gate.sh [pipeline.yaml] [baseline-report.json]
#
# Environment: EDGEKD_RUN_DIR (default runs/ci), EDGEKD_LATENCY_MODE (relative | absolute | auto; default
# relative: shared CI runners vary, the ratio to the teacher measured in the same run does not),
# EDGEKD_CHECK_ONLY=1 (skip the run; re-check an existing $EDGEKD_RUN_DIR/report.json, e.g. one produced
# on a benchmark machine).
# Exit: 0 ok · 1 budget breached or regression · 2 bad input · 3 a stage failed. An inconclusive
# comparison (edgekd compare exit 4: noise larger than the threshold) prints a warning and does not fail.
set -u

CONFIG=${1:-pipeline.yaml}
BASELINE=${2:-${EDGEKD_BASELINE:-}}
RUN_DIR=${EDGEKD_RUN_DIR:-runs/ci}
MODE=${EDGEKD_LATENCY_MODE:-relative}
mkdir -p ci-results

status=0
if [ "${EDGEKD_CHECK_ONLY:-0}" = "1" ]; then
    edgekd check "$RUN_DIR/report.json" --junit ci-results/budgets.xml || status=$?
else
    edgekd run "$CONFIG" --output-dir "$RUN_DIR" --junit ci-results/budgets.xml || status=$?
fi
case $status in
    0) echo "edgekd: every budget met" ;;
    1) echo "edgekd: budget breached (see above and $RUN_DIR/report.md)" ;;
    *) echo "edgekd: failed with exit code $status" >&2; exit "$status" ;;
esac

if [ -n "$BASELINE" ] && [ -f "$BASELINE" ]; then
    compared=0
    edgekd compare "$BASELINE" "$RUN_DIR/report.json" --latency-mode "$MODE" \
        --max-latency-regression 10% --max-accuracy-drop 0.005 --junit ci-results/compare.xml || compared=$?
    case $compared in
        0) ;;
        1) status=1 ;;
        4) echo "edgekd compare: inconclusive (timing noise larger than the threshold); not failing" ;;
        *) exit "$compared" ;;
    esac
fi
exit "$status"
