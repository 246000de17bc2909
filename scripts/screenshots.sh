#!/usr/bin/env bash
# Screenshots of the TensorBoard panels for the README, from this project's own digits example.
# Needs Debian's chromium (apt-get install -y chromium) and the package installed in .venv.
#   bash scripts/screenshots.sh [OUTDIR=docs]
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-docs}
work=$(mktemp -d)
port=${PORT:-6116}
py=${PYTHON:-.venv/bin/python}
mkdir -p "$out"

"$py" examples/digits_cnn.py --logdir "$work/runs" > "$work/demo.log" 2>&1
"$py" -m tensorboard.main --logdir "$work/runs" --port "$port" --host 127.0.0.1 > "$work/tensorboard.log" 2>&1 &
tensorboard_pid=$!
trap 'kill $tensorboard_pid 2>/dev/null || true; rm -rf "$work"' EXIT
for _ in $(seq 60); do curl -sf "http://127.0.0.1:$port/" > /dev/null && break; sleep 1; done

for dashboard in scalars images custom_scalars; do
  chromium --headless --no-sandbox --disable-gpu --disable-quic --no-first-run --disable-background-networking \
    --disable-component-update --disable-sync --hide-scrollbars --user-data-dir="$work/chrome-$dashboard" \
    --window-size=1400,1000 --virtual-time-budget=20000 --screenshot="$out/tensorboard-$dashboard.png" \
    "http://127.0.0.1:$port/#$dashboard" > "$work/chrome-$dashboard.log" 2>&1
  echo "wrote $out/tensorboard-$dashboard.png"
done
