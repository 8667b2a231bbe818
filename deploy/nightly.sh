#!/usr/bin/env bash
# The nightly run: every chaos scenario (`drover-chaos run --all`, each against its own stack
# of the real binaries, judged by the oracle), then the stress profile (deploy/stress.sh).
# Reports go to a dated directory:
#
#   nightly-reports/YYYY-MM-DD-HHMM/chaos/report.md   (+ report.json, per-scenario logs)
#   nightly-reports/YYYY-MM-DD-HHMM/stress/summary.md (+ report.json, SVG charts)
#   nightly-reports/YYYY-MM-DD-HHMM/summary.md        (both one-liners and the exit codes)
#
#   deploy/nightly.sh           # release build, all 13 scenarios full size, stress profile
#                               # (measured on the 2-core build machine: 534 s with a warm
#                               # release build; a cold release build adds about 10 min)
#   deploy/nightly.sh --smoke   # debug build, the CI set of 4 scenarios (~20 s of load each)
#                               # and the tiny stress (20 runs); a few minutes
#   SEED=1234 deploy/nightly.sh # replay a night's fault schedule (the seed is in the report)
#
# Needs root (private Postgres runs as the `postgres` user; disk-full mounts a tmpfs) and the
# services of deploy/local-services.sh. Exit code non-zero if any scenario found a violation
# or could not run, or the stress run failed.
set -euo pipefail
cd "$(dirname "$0")/.."

smoke=0
case "${1:-}" in
  --smoke) smoke=1 ;;
  "") ;;
  *) echo "usage: $0 [--smoke]" >&2; exit 2 ;;
esac

dir="nightly-reports/$(date -u +%Y-%m-%d-%H%M)"
seed="${SEED:-$(date -u +%Y%m%d)}"
mkdir -p "$dir"
bash deploy/local-services.sh

target=${CARGO_TARGET_DIR:-target}
if [ "$smoke" = 1 ]; then
  profile=debug
  cargo build --locked -q -p drover-api -p drover-dispatcher -p drover-agent -p drover-chaos --bins
  chaos_args=(--smoke)
  stress_args=(--smoke)
else
  profile=release
  cargo build --release --locked -q -p drover-api -p drover-dispatcher -p drover-agent -p drover-chaos --bins
  chaos_args=(--all)
  stress_args=()
fi

echo "== chaos (seed $seed) -> $dir/chaos"
chaos_status=0
"$target/$profile/drover-chaos" run "${chaos_args[@]}" --seed "$seed" \
  --bin-dir "$target/$profile" --out "$dir/chaos" || chaos_status=$?

echo "== stress -> $dir/stress"
stress_status=0
DROVER_STRESS_OUT="$dir/stress" bash deploy/stress.sh "${stress_args[@]}" || stress_status=$?

{
  echo "# drover nightly $(basename "$dir")"
  echo
  echo "- chaos (seed $seed): exit $chaos_status — [report](chaos/report.md)"
  sed -n '3p' "$dir/chaos/report.md" 2>/dev/null | sed 's/^/  /'
  echo "- stress: exit $stress_status — [summary](stress/summary.md)"
} > "$dir/summary.md"
cat "$dir/summary.md"

[ "$chaos_status" = 0 ] && [ "$stress_status" = 0 ]
