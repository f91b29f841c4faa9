/* cgroup/connect4 and cgroup/getpeername4: outbound capture of enrolled pods' TCP connects. */
#include "include/nodemesh.h"

/* connect4: attached (multi) to the node's pod cgroup. Not enrolled, not TCP, or 127.0.0.0/8
 * -> untouched. Else save the destination by socket cookie and dial 127.0.0.1:15001 instead. */
int nm_connect4(struct bpf_sock_addr *ctx)
{
    if (ctx->type != NM_SOCK_STREAM)
        return 1;
    if (ctx->protocol != IPPROTO_TCP && ctx->protocol != 0)
        return 1;
    __u64 netns = bpf_get_netns_cookie(ctx);
    if (!pod_by_netns.lookup(&netns))
        return 1;
    __u32 dst = ctx->user_ip4;
    /* The pod's own loopback (and our own 15001 listener) stays local. */
    if ((bpf_ntohl(dst) >> 24) == 127) {
        nm_count(NM_CTR_CONNECT_LOOPBACK);
        return 1;
    }
    struct nm_orig_dst orig = {};
    orig.ip4 = dst;
    orig.port = (__u16)ctx->user_port;
    __u64 cookie = nm_get_socket_cookie(ctx);
    /* Fail closed: without a saved destination the relay could not forward this connection. */
    if (orig_dst_by_cookie.update(&cookie, &orig) != 0) {
        nm_count(NM_CTR_CONNECT_SAVE_FAILED);
        return 0;
    }
    ctx->user_ip4 = bpf_htonl(0x7f000001);
    ctx->user_port = bpf_htons(NM_PORT_OUTBOUND);
    nm_count(NM_CTR_CONNECT_REDIRECTED);
    return 1;
}

/* getpeername4: the app sees the address it dialled, not 127.0.0.1:15001. */
int nm_getpeername4(struct bpf_sock_addr *ctx)
{
    if (ctx->type != NM_SOCK_STREAM)
        return 1;
    __u64 netns = bpf_get_netns_cookie(ctx);
    if (!pod_by_netns.lookup(&netns))
        return 1;
    __u64 cookie = nm_get_socket_cookie(ctx);
    struct nm_orig_dst *orig = orig_dst_by_cookie.lookup(&cookie);
    if (!orig)
        return 1;
    ctx->user_ip4 = orig->ip4;
    ctx->user_port = orig->port;
    nm_count(NM_CTR_GETPEERNAME_RESTORED);
    return 1;
}
