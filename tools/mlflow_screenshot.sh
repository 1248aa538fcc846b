#!/usr/bin/env bash
# Screenshot an MLflow experiment's runs page (a pipeline's parent run with its nested stage
# runs) with headless Chromium: starts `mlflow ui` on 127.0.0.1 in the background, waits for
# it, takes the screenshot, stops the server. Parent runs open collapsed; with Python's
# `websockets` (a Prefect dependency) Chromium is driven over its DevTools protocol to expand
# them first, otherwise it is a plain `chromium --screenshot`.
#
# Usage: tools/mlflow_screenshot.sh BACKEND_URI OUT.png [EXPERIMENT] [WIDTH,HEIGHT]
#   e.g. tools/mlflow_screenshot.sh sqlite:///$PWD/mlflow.db /tmp/mlflow_runs.png chipprune
#
# MLflow may upgrade an old store's schema when it opens it: point it at a copy when in doubt.
# Environment: MLFLOW (default: mlflow on PATH, else .venv/bin/mlflow), CHROMIUM (default:
# /usr/bin/chromium or chromium on PATH), PORT (default: a free one), WAIT (seconds, 90).
# Exit status: 0 ok, 1 DevTools step failed, 2 usage, 3 chromium or mlflow missing, 4 server
# not up, 5 no experiment, 6 screenshot not written.
set -euo pipefail

usage() {
    echo "usage: $0 BACKEND_URI OUT.png [EXPERIMENT] [WIDTH,HEIGHT]" >&2
    exit 2
}
[[ $# -ge 2 && $# -le 4 ]] || usage
uri=$1
out=$2
experiment=${3:-chipprune}
size=${4:-1400,900}
wait_s=${WAIT:-90}

here=$(cd "$(dirname "$0")/.." && pwd)
mlflow_bin=${MLFLOW:-$(command -v mlflow || echo "$here/.venv/bin/mlflow")}
python_bin=$(dirname "$mlflow_bin")/python
[[ -x $python_bin ]] || python_bin=python3
browser=${CHROMIUM:-$(command -v chromium || command -v chromium-browser || echo /usr/bin/chromium)}
[[ -x $mlflow_bin ]] || { echo "error: mlflow not found ($mlflow_bin)" >&2; exit 3; }
[[ -x $browser ]] || { echo "error: chromium not found ($browser)" >&2; exit 3; }

port=${PORT:-$("$python_bin" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
base=http://127.0.0.1:$port
log=$(mktemp -t mlflow-ui.XXXXXX.log)
profile=$(mktemp -d -t chromium-profile.XXXXXX)

export MLFLOW_DISABLE_TELEMETRY=true DO_NOT_TRACK=1
# Its own session, so that stopping it stops its workers too.
setsid "$mlflow_bin" ui --backend-store-uri "$uri" --host 127.0.0.1 --port "$port" >"$log" 2>&1 &
server=$!
stop() {  # the server and its workers (uvicorn, huey consumers): the whole process group
    kill -TERM -- "-$server" 2>/dev/null || true
    for _ in $(seq 40); do kill -0 -- "-$server" 2>/dev/null || break; sleep 0.5; done
    kill -KILL -- "-$server" 2>/dev/null || true
    wait "$server" 2>/dev/null || true
    rm -rf "$profile"
}
trap stop EXIT

for ((i = 0; i < wait_s * 2; i++)); do
    curl -fs "$base/health" >/dev/null 2>&1 && break
    kill -0 "$server" 2>/dev/null || { echo "error: mlflow ui exited:" >&2; tail -20 "$log" >&2; exit 4; }
    sleep 0.5
done
curl -fs "$base/health" >/dev/null || { echo "error: mlflow ui not up after ${wait_s}s" >&2; exit 4; }

exp_id=$(curl -fs -G "$base/api/2.0/mlflow/experiments/get-by-name" \
    --data-urlencode "experiment_name=$experiment" |
    "$python_bin" -c 'import json, sys; print(json.load(sys.stdin)["experiment"]["experiment_id"])') ||
    { echo "error: no experiment named '$experiment' in $uri" >&2; exit 5; }

mkdir -p "$(dirname "$out")"
out_abs=$(realpath -m "$out")
rm -f "$out_abs"
url="$base/#/experiments/$exp_id/runs"
flags=(--headless --no-sandbox --disable-gpu --disable-quic --no-first-run
    --disable-background-networking --disable-component-update --disable-sync
    --user-data-dir="$profile" --window-size="$size")

if ! "$python_bin" -c 'import websockets.sync.client' 2>/dev/null; then
    # No DevTools client: a plain screenshot, parent runs collapsed.
    "$browser" "${flags[@]}" --screenshot="$out_abs" --virtual-time-budget=10000 "$url" \
        >/dev/null 2>&1 || true
else
    # The runs table opens with nested runs collapsed under their parents, and that state
    # is in neither the URL nor a shared view: drive Chromium over the DevTools protocol to
    # expand every parent, close the assistant panel, fit the name column, then capture.
    dbg=$("$python_bin" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    setsid "$browser" "${flags[@]}" --remote-debugging-address=127.0.0.1 \
        --remote-debugging-port="$dbg" about:blank >/dev/null 2>&1 &
    browser_pid=$!
    trap 'kill -TERM -- "-$browser_pid" 2>/dev/null || true; stop' EXIT
    "$python_bin" - "$dbg" "$url" "$out_abs" "$size" <<'PY'
import base64, itertools, json, sys, time, urllib.request

from websockets.sync.client import connect

dbg, url, out, size = sys.argv[1:5]
width, height = (int(v) for v in size.split(","))
EXPAND = """(async () => {
  const sleep = ms => new Promise(r => setTimeout(r, ms));
  const close = document.querySelector('button[data-component-id="mlflow.assistant.chat_panel.close"]');
  if (close) { close.click(); await sleep(500); }
  const done = new Set();
  for (let round = 0; round < 8; round++) {  // a newly shown child may be a parent too
    let clicked = 0;
    for (const row of document.querySelectorAll('.ag-row')) {
      const button = row.querySelector('button[data-component-id$="runnamecellrenderer.tsx_46"]');
      const link = row.querySelector('a[href*="/runs/"]');
      if (!button || !link || done.has(link.getAttribute('href'))) continue;
      done.add(link.getAttribute('href')); button.click(); clicked++; await sleep(300);
    }
    if (!clicked) break;
    await sleep(700);
  }
  const header = Array.from(document.querySelectorAll('.ag-header-cell'))
    .find(h => (h.getAttribute('col-id') || '').includes('Run Name'));
  const resize = header && header.querySelector('.ag-header-cell-resize');
  if (resize) { resize.dispatchEvent(new MouseEvent('dblclick', {bubbles: true})); await sleep(500); }
  return done.size;
})()"""

deadline = time.monotonic() + 30
while True:
    try:
        pages = json.load(urllib.request.urlopen(f"http://127.0.0.1:{dbg}/json/list", timeout=2))
        page = next(p for p in pages if p["type"] == "page")
        break
    except (OSError, StopIteration, ValueError):
        if time.monotonic() > deadline:
            sys.exit("error: chromium's DevTools endpoint did not come up")
        time.sleep(0.5)
ws = connect(page["webSocketDebuggerUrl"], max_size=None, open_timeout=20)
ids = itertools.count(1)


def call(method, **params):
    i = next(ids)
    ws.send(json.dumps({"id": i, "method": method, "params": params}))
    while True:
        msg = json.loads(ws.recv(timeout=60))
        if msg.get("id") == i:
            if "error" in msg:
                raise RuntimeError(f"{method}: {msg['error']}")
            return msg.get("result", {})


def js(expression):
    result = call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
    return result.get("result", {}).get("value")


call("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1, mobile=False)
call("Page.navigate", url=url)
deadline = time.monotonic() + 30
while not js("document.querySelectorAll('.ag-row').length"):
    if time.monotonic() > deadline:
        sys.exit("error: the runs table did not render in 30 s")
    time.sleep(0.5)
time.sleep(1)
print(f"expanded {js(EXPAND)} parent runs", file=sys.stderr)
with open(out, "wb") as f:
    f.write(base64.b64decode(call("Page.captureScreenshot", format="png")["data"]))
ws.close()
PY
fi
[[ -s $out_abs ]] || { echo "error: no screenshot written" >&2; exit 6; }
echo "$out_abs: experiment '$experiment' ($exp_id) at $base"
