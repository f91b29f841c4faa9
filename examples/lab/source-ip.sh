#!/bin/sh
# Source-IP preservation in a running lab (`nodemesh lab up`): every app sees its caller's IP, on
# every path into the pod, not its own pod IP. Prints one line per path:
#   <path>: <pod that answered> saw <peer address>   (caller <caller's pod IP>)
# and the policy routing the agent set up in httpbin-v1's netns for it.
# NODEMESH overrides the command (default: nodemesh).
set -eu
nm=${NODEMESH:-nodemesh}

ip_of() { $nm lab status -o json | python3 -c "
import json, sys
print(next(p['ip'] for p in json.load(sys.stdin)['pods'] if p['name'] == sys.argv[1]))" "$1"; }

call() {  # <label> <from pod> <url>
    $nm lab exec "$2" -- curl -sS --max-time 5 "$3" | python3 -c "
import json, sys
body = json.load(sys.stdin)
print(f\"{sys.argv[1]}: {body['pod']} saw {body['peer']}   (caller {sys.argv[2]})\")" "$1" "$(ip_of "$2")"
}

v1=$(ip_of httpbin-v1)
v2=$(ip_of httpbin-v2)
call "cross-node, HBONE  " client "http://$v2:8000/"
call "same node          " client "http://$v1:8000/"
call "service VIP        " client "http://10.96.0.10:8000/"
call "plaintext, 15006   " outsider "http://$v1:8000/"

echo "policy routing in httpbin-v1's netns:"
netns=$($nm lab status -o json | python3 -c "
import json, sys
print(next(p['netns'] for p in json.load(sys.stdin)['pods'] if p['name'] == 'httpbin-v1'))")
ip -n "$(basename "$netns")" rule show fwmark 0x4e4d/0xffff
ip -n "$(basename "$netns")" route show table 20045
ip netns exec "$(basename "$netns")" sysctl net.ipv4.tcp_fwmark_accept
