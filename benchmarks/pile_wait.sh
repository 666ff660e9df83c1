#!/usr/bin/env bash
# The waiting calls of issue 23's device job (benchmarks/pile_device.sh): wait up to SECONDS for RUN/done,
# mirroring the job's small results into OUT every 10 s, so that a call cut short (at the session's
# device-time limit, or by its own timeout) still brings back the latest; then the log's last lines.
#   bash benchmarks/pile_wait.sh RUN LOG OUT SECONDS
# OUT gets results.tgz (build manifest, summary, figures; the study's summary.tgz), summary.tgz (the
# study's, refreshed after each of its steps) and the log, gzipped (progress bars make it long).
set -uo pipefail
if [ $# -ne 4 ]; then echo "usage: pile_wait.sh RUN LOG OUT SECONDS" >&2; exit 2; fi
run=$1 log=$2 out=$3 limit=$4
mkdir -p "$out"
mirror() {
    local f
    for f in "$run/results.tgz" "$run/study/summary.tgz"; do
        [ -f "$f" ] && cp "$f" "$out/$(basename "$f").part" && mv "$out/$(basename "$f").part" "$out/$(basename "$f")"
    done
    [ -f "$log" ] && gzip -c "$log" > "$out/run.log.gz.part" && mv "$out/run.log.gz.part" "$out/run.log.gz"
    return 0
}
end=$((SECONDS + limit))
while [ ! -f "$run/done" ] && [ $SECONDS -lt $end ]; do
    mirror
    sleep 10
done
mirror
[ -f "$log" ] && tr '\r' '\n' < "$log" | grep -v 'it/s\|s/it' | grep -v '^\s*$' | tail -30
if [ -f "$run/done" ]; then echo "== job done, exit $(cat "$run/done")"; else echo "== job still running"; fi
exit 0
