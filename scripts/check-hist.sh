#!/usr/bin/env bash
# rtrs-perf --hist as other tools see it: two short runs write interval logs,
# the Python HdrHistogram package (pip: hdrhistogram) reads them back (an
# interval a second per direction, counts summing to the run's IOs), and
# scripts/plot-latency draws both side by side; fio's fio_jsonplus_clat2csv
# reads the --json (when fio is installed). Exit 77 when the Python
# package cannot be had (offline, no venv): the Rust tests read the logs too.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/lib.sh
source scripts/lib.sh

build_bins
export RTRS_PERF=$PWD/target/release/rtrs-perf
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

py=$(ensure_python_hdrhistogram target/pyhdr) || skip "the Python HdrHistogram package cannot be had (the note above)"

for qd in 1 8; do
  "$RTRS_PERF" embedded --rw randrw --iodepth $qd --runtime 2.5 --cores 0 --server-core 1 \
    --json --hist "$WORK/qd$qd.hlog" >"$WORK/qd$qd.json" 2>/dev/null
  "$py" - "$WORK/qd$qd.hlog" "$WORK/qd$qd.json" <<'PY'
import json, sys
from hdrh.histogram import HdrHistogram
from hdrh.log import HistogramLogReader
log, js = sys.argv[1], sys.argv[2]
run = json.loads(open(js).read().strip().splitlines()[-1])
reader = HistogramLogReader(log, HdrHistogram(1, 100_000_000_000, 3))
by_tag = {}
while True:
    h = reader.get_next_interval_histogram()
    if h is None:
        break
    by_tag.setdefault(h.get_tag(), []).append(h.get_total_count())
total = sum(sum(v) for v in by_tag.values())
print(f"{log}: {dict((t, len(v)) for t, v in by_tag.items())} intervals, {total} IOs (the run: {run['ios']})")
assert sorted(by_tag) == ["read", "write"], by_tag
assert all(len(v) == 3 for v in by_tag.values()), "2.5 s: three intervals a direction"
assert total == run["ios"], (total, run["ios"])
PY
done

# fio's own json+ tool reads the fio-shaped JSON (and checks its CSV against it).
if command -v fio_jsonplus_clat2csv >/dev/null; then
  fio_jsonplus_clat2csv "$WORK/qd8.json" "$WORK/clat"
  fio_jsonplus_clat2csv --validate "$WORK/qd8.json" "$WORK/clat" | grep -q validated
  echo "fio_jsonplus_clat2csv read and validated rtrs-perf's --json"
else
  echo "note: fio_jsonplus_clat2csv (package fio) not installed: not tried" >&2
fi

scripts/plot-latency --out "$WORK/qd.svg" --title "QD1 vs QD8" "$WORK/qd1.hlog" "$WORK/qd8.hlog"
lines=$(grep -c "<polyline" "$WORK/qd.svg")
[ "$lines" -eq 4 ] || { echo "plot-latency: $lines lines, expected 4 (2 logs x read/write)" >&2; exit 1; }
"$py" -c 'import sys, xml.dom.minidom as m; m.parse(sys.argv[1])' "$WORK/qd.svg"
echo "check-hist: the Python HdrHistogram reads rtrs-perf's logs; plot-latency drew them"
