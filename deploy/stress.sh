#!/usr/bin/env bash
# The stress profile: release binaries, a throwaway stack (`--spawn-stack`: fresh database,
# vhost and Redis prefix; stopped by PID at the end), drover side by side with the bare
# `docker run` and Celery baselines. Reports go to a dated directory under stress-reports/.
#
#   deploy/stress.sh            # 200 no-op Docker runs at concurrency 8, docker + celery
#   deploy/stress.sh --smoke    # 20 runs at concurrency 4, docker baseline only (CI-sized)
#   deploy/stress.sh -- --rate 20 --duration 1h   # anything after -- goes to drover-chaos
#
# Exit code non-zero if the oracle found a violation or the run could not be set up.
set -euo pipefail
cd "$(dirname "$0")/.."

smoke=0
extra=()
while [ $# -gt 0 ]; do
  case "$1" in
    --smoke) smoke=1 ;;
    --) shift; extra=("$@"); break ;;
    *) echo "usage: $0 [--smoke] [-- drover-chaos stress args]" >&2; exit 2 ;;
  esac
  shift
done

bash deploy/local-services.sh
if [ "$smoke" = 1 ]; then
  profile=debug
  cargo build --locked -q -p drover-api -p drover-dispatcher -p drover-agent -p drover-chaos --bins
  args=(--runs 20 --concurrency 4 --baseline docker)
else
  profile=release
  cargo build --release --locked -q -p drover-api -p drover-dispatcher -p drover-agent -p drover-chaos --bins
  args=(--runs 200 --concurrency 8 --baseline docker --baseline celery)
fi
target=${CARGO_TARGET_DIR:-target}
# DROVER_STRESS_OUT: where the report goes instead (deploy/nightly.sh sets it).
out="${DROVER_STRESS_OUT:-stress-reports/$(date -u +%Y%m%dT%H%M%SZ)}"
"$target/$profile/drover-chaos" stress --spawn-stack --bin-dir "$target/$profile" \
  --out "$out" "${args[@]}" "${extra[@]}"
echo "summary: $out/summary.md"
