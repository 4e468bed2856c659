#!/bin/sh
# One BEAM node of the comparison (see node.exs), named $HIGHLANDER_NODE on
# 127.0.0.1, distribution and epmd on loopback only (the harness picks
# ERL_EPMD_PORT), no automatic reconnection (so a cut stays cut), and a net
# tick of $HL_NET_TICKTIME seconds (default 4; the BEAM's own default is 60).
exec elixir --name "$HIGHLANDER_NODE@127.0.0.1" --cookie "$HIGHLANDER_COOKIE" \
  --erl "-kernel inet_dist_use_interface {127,0,0,1} -kernel dist_auto_connect once -kernel net_ticktime ${HL_NET_TICKTIME:-4}" \
  "$(dirname "$0")/node.exs"
