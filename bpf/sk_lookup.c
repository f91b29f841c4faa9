/* sk_lookup: inbound capture. One program, one BPF link per enrolled pod netns. */
#include "include/nodemesh.h"

int nm_sk_lookup(struct bpf_sk_lookup *ctx)
{
    if (ctx->protocol != IPPROTO_TCP || ctx->family != 2 /* AF_INET */)
        return SK_PASS;
    __u32 port = ctx->local_port;
    /* The agent's own listeners receive their traffic directly. */
    if (port == NM_PORT_HBONE || port == NM_PORT_OUTBOUND || port == NM_PORT_INBOUND) {
        nm_count(NM_CTR_SKLOOKUP_PASSED);
        return SK_PASS;
    }
    /* The pod talking to itself, which includes the relay's own connection to the app (made
     * from inside the pod netns to the pod IP). Local traffic reports the output device, not
     * lo, as ingress_ifindex on this kernel, so test the addresses as well as ifindex 1. */
    if (ctx->ingress_ifindex == 1 || ctx->remote_ip4 == ctx->local_ip4) {
        nm_count(NM_CTR_SKLOOKUP_PASSED);
        return SK_PASS;
    }
    __u32 ip = ctx->local_ip4;
    struct bpf_sock *sk = (struct bpf_sock *)inbound_listener.lookup(&ip);
    if (!sk) {
        /* The link exists only while the pod is enrolled: no listener means the pod must not
         * receive unproxied traffic. Fail closed. */
        nm_count(NM_CTR_SKLOOKUP_FAIL_CLOSED);
        return SK_DROP;
    }
    long err = bpf_sk_assign(ctx, sk, 0);
    bpf_sk_release(sk);
    if (err) {
        nm_count(NM_CTR_SKLOOKUP_FAIL_CLOSED);
        return SK_DROP;
    }
    nm_count(NM_CTR_SKLOOKUP_REDIRECTED);
    return SK_PASS;
}
