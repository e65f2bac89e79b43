#!/usr/bin/env bash
# The appliance demo: a PostgreSQL sandbox with a published port and a generated password,
# then a second sandbox from the same warm snapshot, whose password is its own.
#
#   1. kiln create --image postgres --publish P1:5432 --secret PGPASSWORD
#      (the first start boots cold, waits for pg_isready, captures the warm snapshot, then
#      restores it; the image's on-restore hook sets the postgres role's password from the
#      secret)
#   2. psql from the host through the tunnel with that password: create a table and a row
#   3. a second sandbox restored from the same warm snapshot, with its own password
#   4. the first password is refused there, the second works; both start times are printed
#
# Needs: a built kiln (scripts/build) and psql on the host (scripts/setup-host installs it).
# Usage: examples/appliance.sh        (KILN_HOME as for kiln; KILN to use another binary)
set -euo pipefail
cd "$(dirname "$0")/.."
KILN=${KILN:-target/release/kiln}

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
now_ms() { date +%s%3N; }
ids=()
cleanup() { [ ${#ids[@]} -eq 0 ] || "$KILN" rm "${ids[@]}" >/dev/null 2>&1 || true; }
trap cleanup EXIT

# Starts a postgres sandbox on host port $1; sets ID, PASSWORD, SOURCE, SNAPSHOT and MS.
start() {
    local json t0
    t0=$(now_ms)
    json=$("$KILN" create --json --image postgres --publish "$1:5432" --secret PGPASSWORD)
    MS=$(( $(now_ms) - t0 ))
    # One line each: id, how its VM started, the snapshot it came from, the generated password.
    { read -r ID; read -r SOURCE; read -r SNAPSHOT; read -r PASSWORD; } < <(python3 -c '
import json, sys
v = json.load(sys.stdin)
print(v["id"]); print(v["source"]); print(v.get("snapshot") or "")
print(v.get("generated_secrets", {}).get("PGPASSWORD", ""))' <<<"$json")
    ids+=("$ID")
    [ -n "$PASSWORD" ] || { echo "appliance: no generated password announced" >&2; exit 1; }
}

psql_as() { # port password sql...
    local port=$1 pw=$2
    shift 2
    PGPASSWORD=$pw PGCONNECT_TIMEOUT=20 psql -X -q -t -A -h 127.0.0.1 -p "$port" -U postgres -d postgres -v ON_ERROR_STOP=1 "$@"
}

"$KILN" image build postgres >/dev/null
# Measure the cold capture on the first start: any earlier warm snapshot of the image goes.
for s in $("$KILN" snapshot ls --json | python3 -c 'import json,sys; [print(s["name"]) for s in json.load(sys.stdin)["snapshots"] if s["kind"]=="warm" and s["image"]=="postgres"]'); do
    "$KILN" snapshot rm "$s" >/dev/null 2>&1 || true
done

p1=$(free_port)
start "$p1"
id1=$ID pw1=$PASSWORD cold_ms=$MS snap1=$SNAPSHOT
[ "$SOURCE" = snapshot ] || { echo "appliance: FAIL: the first start did not restore its capture ($SOURCE)" >&2; exit 1; }
psql_as "$p1" "$pw1" -c "CREATE TABLE visits (who text); INSERT INTO visits VALUES ('first sandbox');"
rows1=$(psql_as "$p1" "$pw1" -c "SELECT count(*) FROM visits")

p2=$(free_port)
start "$p2"
id2=$ID pw2=$PASSWORD warm_ms=$MS
# Both came from the one warm snapshot of postgres (the first start captured it).
if [ "$SOURCE" != snapshot ] || [ -z "$SNAPSHOT" ] || [ "$SNAPSHOT" != "$snap1" ]; then
    echo "appliance: FAIL: sandbox 2 started from '$SOURCE' '$SNAPSHOT', not the warm snapshot '$snap1'" >&2
    exit 1
fi
"$KILN" snapshot ls --json | python3 -c '
import json, sys
name = sys.argv[1]
s = [s for s in json.load(sys.stdin)["snapshots"] if s["name"] == name]
assert s and s[0]["kind"] == "warm" and s[0]["image"] == "postgres", f"{name} is not the warm snapshot of postgres: {s}"
' "$snap1"
[ "$pw1" != "$pw2" ] || { echo "appliance: both sandboxes got the same password" >&2; exit 1; }

if psql_as "$p2" "$pw1" -c "SELECT 1" >/dev/null 2>&1; then
    echo "appliance: FAIL: the first sandbox's password works in the second" >&2
    exit 1
fi
psql_as "$p2" "$pw2" -c "SELECT 1" >/dev/null
# The second sandbox is the snapshot's state, not the first sandbox's: no table there.
tables2=$(psql_as "$p2" "$pw2" -c "SELECT count(*) FROM pg_tables WHERE tablename = 'visits'")

echo "sandbox 1: $id1  port $p1  password ${pw1:0:8}…  rows in visits: $rows1"
echo "sandbox 2: $id2  port $p2  password ${pw2:0:8}…  visits tables: $tables2"
echo "first password in sandbox 2: refused; its own password: accepted"
echo "start 1 (cold boot + pg_isready + capture + restore): ${cold_ms} ms"
echo "start 2 (restore from the warm snapshot $snap1): ${warm_ms} ms"
[ "$rows1" = 1 ] && [ "$tables2" = 0 ]
echo "appliance: OK"
