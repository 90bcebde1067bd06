#!/usr/bin/env bash
# Run a long command across several short remote calls (the lent GPU machine allows 10 minutes a
# call; the matrix takes longer): `start` detaches it in its own session, logging to DIR; `wait`
# returns when it ends or after SECONDS, and packs DIR into $OUT/DIR-name.tgz either way.
#   bash benchmarks/detached.sh start DIR command ...
#   bash benchmarks/detached.sh wait DIR SECONDS
set -uo pipefail
verb=$1 dir=$2; shift 2
case $verb in
  start) mkdir -p "$dir"
         OUT=$dir setsid nohup "$@" >"$dir/console.log" 2>&1 </dev/null &
         echo $! >"$dir/pid"; echo "started $* as pid $(cat "$dir/pid"), logging to $dir/console.log" ;;
  wait) end=$((SECONDS + $1))
        while kill -0 "$(cat "$dir/pid")" 2>/dev/null && [ $SECONDS -lt $end ]; do sleep 5; done
        if kill -0 "$(cat "$dir/pid")" 2>/dev/null; then echo "still running"; else echo "finished"; fi
        tail -c 6000 "$dir/console.log"
        [ -n "${OUT:-}" ] && tar czf "$OUT/$(basename "$dir").tgz" -C "$(dirname "$dir")" "$(basename "$dir")" ;;
  *) echo "detached.sh: start or wait" >&2; exit 2 ;;
esac
