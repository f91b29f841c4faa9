/* sockops: re-key the saved destination by (netns cookie, local port) before the SYN leaves. */
#include "include/nodemesh.h"

int nm_sockops(struct bpf_sock_ops *skops)
{
    __u32 op = skops->op;
    if (op != BPF_SOCK_OPS_TCP_CONNECT_CB && op != BPF_SOCK_OPS_STATE_CB)
        return 1;
    if (skops->family != 2 /* AF_INET */)
        return 1;
    __u64 netns = bpf_get_netns_cookie(skops);
    if (!pod_by_netns.lookup(&netns))
        return 1;
    __u64 cookie = nm_get_socket_cookie(skops);
    struct nm_tuple_key key = {};
    key.netns_cookie = netns;
    key.local_port = skops->local_port; /* host byte order */

    if (op == BPF_SOCK_OPS_STATE_CB) {
        if (skops->args[1] == BPF_TCP_CLOSE) {
            if (orig_dst_by_cookie.delete(&cookie) == 0)
                nm_count(NM_CTR_CONN_CLOSED);
            orig_dst_by_tuple.delete(&key);
        }
        return 1;
    }
    /* TCP_CONNECT_CB: the local port is bound, the SYN is not sent yet. */
    struct nm_orig_dst *orig = orig_dst_by_cookie.lookup(&cookie);
    if (!orig) {
        nm_count(NM_CTR_SOCKOPS_MISS);
        return 1;
    }
    struct nm_orig_dst copy = *orig;
    orig_dst_by_tuple.update(&key, &copy);
    /* Keep the cookie entry for getpeername4; both are removed at close. */
    bpf_sock_ops_cb_flags_set(skops, BPF_SOCK_OPS_STATE_CB_FLAG);
    nm_count(NM_CTR_SOCKOPS_REKEYED);
    return 1;
}
