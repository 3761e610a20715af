#!/usr/bin/env bash
# Runs tally on the shipped sample log and prints the report calls it would send to 3scale
# (--dry-run: nothing is sent, no account needed). 3scale takes only the last 24 hours, so the
# sample's times are first moved to the last ten minutes. TALLY_BIN picks a built binary instead of
# `cargo run --release`.
set -euo pipefail
export LC_ALL=C
here="$(cd "$(dirname "$0")" && pwd)"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
now=$(date -u +%s)
first=""
time_re='\[([0-9]{2})/([A-Za-z]{3})/([0-9]{4}):([0-9:]{8}) ([+-][0-9]{4})\]'
while IFS= read -r line; do
  if [[ $line =~ $time_re ]]; then
    m=("${BASH_REMATCH[@]}")
    t=$(date -u -d "${m[1]} ${m[2]} ${m[3]} ${m[4]} ${m[5]}" +%s)
    first=${first:-$t}
    shifted=$(date -u -d "@$((now - 600 + t - first))" "+%d/%b/%Y:%H:%M:%S +0000")
    line="${line/"${m[0]}"/[$shifted]}"
  fi
  printf '%s\n' "$line"
done < "$here/example-access.log" > "$work/example-access.log"
sed "s|^path = .*|path = \"$work/example-access.log\"|" "$here/example.toml" > "$work/example.toml"
if [ -n "${TALLY_BIN:-}" ]; then
  "$TALLY_BIN" run --config "$work/example.toml" --dry-run --once
else
  cd "$here/.."
  cargo run --release --quiet -- run --config "$work/example.toml" --dry-run --once
fi
