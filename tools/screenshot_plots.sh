#!/usr/bin/env bash
# Screenshot an HTML page (e.g. the index.html written by `dvc plots show`)
# with headless Chromium and the network disabled, to check that the page
# renders offline.
#
# Usage: tools/screenshot_plots.sh PAGE.html OUT.png [WIDTH,HEIGHT]
#
# Network is cut off inside Chromium: every host name resolves to NOTFOUND
# and every proxied request goes to a closed local port, so a page that
# still tries to load a script from a CDN renders blank instead of silently
# passing.  Set CHROMIUM=/path/to/binary to use a specific browser.
#
# Exit status: 0 ok, 2 usage, 3 chromium missing, 4 screenshot not written.
set -euo pipefail

usage() {
    echo "usage: $0 PAGE.html OUT.png [WIDTH,HEIGHT]" >&2
    exit 2
}

[[ $# -ge 2 && $# -le 3 ]] || usage
page=$1
out=$2
size=${3:-1200,1600}

if [[ ! -f $page ]]; then
    echo "error: no such HTML file: $page" >&2
    exit 2
fi

browser=${CHROMIUM:-}
if [[ -z $browser ]]; then
    for cand in chromium chromium-browser google-chrome-stable google-chrome; do
        if command -v "$cand" >/dev/null 2>&1; then
            browser=$(command -v "$cand")
            break
        fi
    done
fi
if [[ -z $browser ]] || ! command -v "$browser" >/dev/null 2>&1; then
    echo "error: chromium not found (install it: apt-get install -y chromium," \
        "or set CHROMIUM=/path/to/chromium)" >&2
    exit 3
fi

page_abs=$(realpath "$page")
mkdir -p "$(dirname "$out")"
out_abs=$(realpath -m "$out")
rm -f "$out_abs"

profile=$(mktemp -d)
trap 'rm -rf "$profile"' EXIT

# Chromium logs a lot of harmless noise (dbus, GPU) on stderr; keep it for
# diagnostics only if the screenshot fails.
log="$profile/chromium.log"
status=0
"$browser" \
    --headless \
    --no-sandbox \
    --disable-gpu \
    --disable-quic \
    --no-first-run \
    --disable-background-networking \
    --disable-component-update \
    --disable-sync \
    --disable-extensions \
    --hide-scrollbars \
    --host-resolver-rules="MAP * ~NOTFOUND" \
    --proxy-server="http://127.0.0.1:9" \
    --proxy-bypass-list="<-loopback>" \
    --user-data-dir="$profile/profile" \
    --window-size="$size" \
    --virtual-time-budget=5000 \
    --screenshot="$out_abs" \
    "file://$page_abs" >"$log" 2>&1 || status=$?

if [[ ! -s $out_abs ]]; then
    echo "error: chromium (exit $status) wrote no screenshot to $out_abs; its log:" >&2
    cat "$log" >&2
    exit 4
fi
echo "$out_abs"
