#!/usr/bin/env bash
# Memory per idle connection: a fresh broker's RSS, then 4 s into a storm of N idle
# connections made with `petrel bench --scenario conn` (they stay for 6 s).
#
#   benches/idle.sh BROKER_BINARY tcp|quic N      e.g. benches/idle.sh target/release/petrel tcp 5000
#
# Raise the open-file limit first for large N (ulimit -n 20000). The load generator is the
# binary named by BENCH [the broker binary].
set -euo pipefail
(($# == 3)) || { sed -n '2,8p' "$0"; exit 2; }
BIN=$1 SCHEME=$2 N=$3
BENCH=${BENCH:-$BIN}
DATA=$(mktemp -d)
PID=""
trap '[[ -n $PID ]] && kill "$PID" 2>/dev/null; rm -rf "$DATA"' EXIT
case $SCHEME in
tcp) SOCK=SOCK_STREAM FLAG=--tcp URL=mqtt ;;
quic) SOCK=SOCK_DGRAM FLAG=--quic URL=quic ;;
*) echo "tcp or quic" >&2; exit 2 ;;
esac
port=$(python3 -c "import socket; s=socket.socket(socket.AF_INET, socket.$SOCK); s.bind(('127.0.0.1',0)); print(s.getsockname()[1])")
"$BIN" "$FLAG" "127.0.0.1:$port" --data-dir "$DATA/data" --set api.bind=127.0.0.1:0 >/dev/null 2>&1 &
PID=$!
sleep 1
before=$(awk '/VmRSS/{print $2}' "/proc/$PID/status")
timeout 60 "$BENCH" bench -u "$URL://127.0.0.1:$port" --insecure --scenario conn --pubs "$N" \
    --duration 6 --json --quiet >/dev/null 2>&1 &
storm=$!
sleep 4
during=$(awk '/VmRSS/{print $2}' "/proc/$PID/status")
wait "$storm" || true
python3 -c "print('%s %s: %d connections, RSS %d KiB before, %d KiB with them: %.2f KiB per connection' % ('$BIN', '$SCHEME', $N, $before, $during, ($during - $before) / $N))"
