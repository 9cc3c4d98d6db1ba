#!/usr/bin/env bash
# pathssl's command line chained as a user's CI would run it. Every step's exit code is checked, and so are the
# files it must leave behind; a bad spec and a corrupt slide must give their documented exit codes and messages.
# Usage: bash scripts/smoke.sh [WORK_DIR]        (nox -s smoke runs this)
set -euo pipefail
cd "$(dirname "$0")/.."
work="${1:-$(mktemp -d)}"
mkdir -p "$work"
log="$work/step.log"
export PATHSSL_PROGRESS=0

fail() { echo "smoke FAILED: $*" >&2; [ -f "$log" ] && tail -n 25 "$log" >&2; exit 1; }
run() {  # run EXPECTED_EXIT COMMAND...
  local want=$1 got
  shift
  echo "-- $* (expect exit $want)"
  set +e; "$@" >"$log" 2>&1; got=$?; set -e
  [ "$got" -eq "$want" ] || fail "exit $got, expected $want: $*"
  ! grep -q "Traceback" "$log" || fail "a traceback reached the user: $*"
}
need() { for f in "$@"; do [ -e "$f" ] || fail "missing $f"; done; }
says() { grep -q -- "$1" "$log" || fail "the message does not mention '$1'"; }
done_ok() { grep -q '"status": "done"' "$1/run.json" || fail "$1/run.json is not marked done"; }

started=$(date +%s)
run 0 pathssl spec validate --no-input-check specs/
run 0 pathssl backbones list --json
run 0 pathssl synthetic slides "$work/slides" --count 2 --size 2048 --corrupt
run 0 pathssl synthetic tiles "$work/labelled" --per-class 8 --size 64
run 0 pathssl synthetic nuclei "$work/nuclei" --count 3 --size 96

# A bad spec: exit 2 before any work, naming the field.
run 2 pathssl pretrain specs/pretrain/tiny_barlow_twins.toml --set "data.tiles=['$work/slides']" \
    --set run.output_dir="$work/never" --set optim.lr=-1
says "optim.lr"
[ ! -e "$work/never" ] || fail "an invalid spec started work"

# A corrupt slide beside good ones: the good ones are tiled, errors.csv names the bad one, exit 1.
run 1 pathssl tile specs/tile/tiny.toml --set "input.slides=['$work/slides/*.tif']" --set output.dir="$work/tiles" \
    --set tiles.size=64 --set tiles.mpp=[0.5]
says "corrupt_slide"
need "$work/tiles/parts" "$work/tiles/errors.csv"
grep -q corrupt_slide "$work/tiles/errors.csv" || fail "errors.csv does not name the corrupt slide"
# Re-running over the good slides only skips what is complete and succeeds; --consolidate exports the index.
run 0 pathssl tile specs/tile/tiny.toml --set "input.slides=['$work/slides/slide_*.tif']" \
    --set output.dir="$work/tiles" --set tiles.size=64 --set tiles.mpp=[0.5] --consolidate
need "$work/tiles/manifest.parquet" "$work/tiles/manifest.csv"

run 0 pathssl pretrain specs/pretrain/tiny_barlow_twins.toml --set "data.tiles=['$work/tiles']" \
    --set run.output_dir="$work/pretrain" --set run.steps=6 --set run.checkpoint_every=3
need "$work/pretrain/backbone.safetensors" "$work/pretrain/spec.toml"
done_ok "$work/pretrain"

weights="$work/pretrain/backbone.safetensors"
run 0 pathssl evaluate linear specs/evaluate/tiny_linear.toml --set data.root="$work/labelled" \
    --set model.weights="$weights" --set run.output_dir="$work/linear"
need "$work/linear/metrics.json" "$work/linear/confusion_matrix.png"
done_ok "$work/linear"
run 0 pathssl evaluate knn specs/evaluate/tiny_knn.toml --set data.root="$work/labelled" \
    --set model.weights="$weights" --set run.output_dir="$work/knn"
need "$work/knn/metrics.json"
run 0 pathssl report "$work/linear" "$work/knn" --out "$work/table.md"
need "$work/table.md"

run 0 pathssl segment score --true "$work/nuclei" --pred "$work/nuclei" --format consep --json
python - "$log" <<'PY' || fail "segment score of the truth against itself is not PQ = 1"
import json, sys
text = open(sys.argv[1]).read()
scores = json.loads(text[text.index("{"):])
assert abs(scores["mean"]["pq"] - 1.0) < 1e-9, scores["mean"]
PY
run 2 pathssl segment score --true "$work/nuclei" --pred "$work/labelled" --format generic
# The tiny study (specs/study/tiny.toml: 16 runs + subsets), killed with SIGKILL mid-grid, then resumed: the runs
# finished before the kill are skipped, the one in progress is taken up again, and the tables are written.
study=(pathssl study specs/study/tiny.toml --set "study.output_root=$work/study"
       --set "study.evaluation_set=['data.root=$work/labelled']")
run 0 "${study[@]}" --dry-run
says "17 runs: 17 pending"
echo "-- ${study[*]} (killed with SIGKILL after its first finished run)"
"${study[@]}" >"$log" 2>&1 &
study_pid=$!
for _ in $(seq 1 600); do
  grep -q ': done in' "$log" && break
  kill -0 "$study_pid" 2>/dev/null || break
  sleep 0.5
done
kill -9 "$study_pid" 2>/dev/null || fail "the study ended before it could be killed"
wait "$study_pid" 2>/dev/null || true
run 0 "${study[@]}"
says "done, skipped"
need "$work/study/report.md" "$work/study/report.csv" "$work/study/report.png" "$work/study/plan.json"
grep -q "mean ± std over replicates" "$work/study/report.md" || fail "report.md has no study table"
run 0 "${study[@]}" --dry-run
says "17 runs: 17 done"
echo "smoke passed in $(( $(date +%s) - started )) s ($work)"
