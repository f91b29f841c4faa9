#!/bin/sh
# Proxy workers in a lab started with two processes per agent:
#   nodemesh lab up --proxy-workers 2
# Makes 12 requests from client (node1) to httpbin-v2 (node2), one connection each, and prints
# which of node1's processes carried each one (connection ids: c… = main process, w1c… = worker 1),
# then node1's status line for its workers. NODEMESH overrides the command (default: nodemesh).
set -eu
nm=${NODEMESH:-nodemesh}

v2=$($nm lab status -o json | python3 -c "
import json, sys
print(next(p['ip'] for p in json.load(sys.stdin)['pods'] if p['name'] == 'httpbin-v2'))")

i=0
while [ $i -lt 12 ]; do
    $nm lab exec client -- curl -sS --max-time 5 -o /dev/null "http://$v2:8000/worker-demo/$i"
    i=$((i + 1))
done

$nm flows --node node1 --last 200 -o json | python3 -c "
import json, re, sys
opened = [f for f in map(json.loads, sys.stdin) if f['event'] == 'open' and f['dst_ip'] == sys.argv[1]][-12:]
for f in opened:
    conn = f['connection_id']
    worker = re.match(r'w(\\d+)', conn)
    who = f'worker {worker.group(1)}' if worker else 'main process'
    print(f\"{conn:>8}  {f['src_ip']}:{f['src_port']} -> {f['dst_ip']}:{f['dst_port']}  carried by {who}\")
print('processes that carried them:', len({re.sub(r'(r\\d+)?c[0-9a-f]+$', '', f['connection_id']) for f in opened}))
" "$v2"
$nm status --node node1 | grep -i "proxy workers"
