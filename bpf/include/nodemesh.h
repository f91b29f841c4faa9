/* nodemesh datapath: constants, structs and maps shared by every program.
 *
 * All programs are compiled as one bcc object (bpf/datapath.c includes the per-hook files) so
 * that they share these maps. The Python mirror is agent/datapath/abi.py; the unit test
 * tests/unit/test_datapath_abi.py parses this header and fails when the two disagree.
 * UAPI headers only.
 */
#ifndef NODEMESH_H
#define NODEMESH_H

#include <uapi/linux/bpf.h>
#include <uapi/linux/in.h>
#include <linux/socket.h>

/* Ports of the per-pod listeners opened by the agent inside each pod netns. */
#define NM_PORT_OUTBOUND 15001 /* 127.0.0.1, captured outbound connections */
#define NM_PORT_INBOUND 15006  /* 0.0.0.0, captured inbound plaintext */
#define NM_PORT_HBONE 15008    /* 0.0.0.0, HBONE tunnel (never captured) */

/* <linux/net.h> is not UAPI: the one socket type we test. */
#define NM_SOCK_STREAM 1

/* Map sizes. */
#define NM_MAX_PODS 1024
#define NM_MAX_CONNS 65536
#define NM_NUM_COUNTERS 16

/* Counter indices (counters map). */
#define NM_CTR_CONNECT_REDIRECTED 0   /* connect4 rewrote to 127.0.0.1:15001 */
#define NM_CTR_CONNECT_LOOPBACK 1     /* connect4 skipped 127.0.0.0/8 of an enrolled pod */
#define NM_CTR_CONNECT_SAVE_FAILED 2  /* connect4 could not save the destination: refused */
#define NM_CTR_SOCKOPS_REKEYED 3      /* sockops moved a destination to the tuple key */
#define NM_CTR_SOCKOPS_MISS 4         /* sockops found no saved destination */
#define NM_CTR_GETPEERNAME_RESTORED 5 /* getpeername4 restored the dialled address */
#define NM_CTR_SKLOOKUP_REDIRECTED 6  /* sk_lookup assigned a SYN to the 15006 listener */
#define NM_CTR_SKLOOKUP_PASSED 7      /* sk_lookup let a SYN through untouched */
#define NM_CTR_SKLOOKUP_FAIL_CLOSED 8 /* sk_lookup dropped: pod enrolled but no listener */
#define NM_CTR_CONN_CLOSED 9          /* sockops cleaned the entries of a closed socket */

/* Value of pod_by_netns. */
struct nm_pod_info {
    __u32 pod_index; /* agent-assigned slot, for logs */
    __u32 flags;     /* reserved, 0 */
};

/* Original destination as the app dialled it; both fields in network byte order. */
struct nm_orig_dst {
    __u32 ip4;
    __u16 port;
    __u16 pad;
};

/* Key of orig_dst_by_tuple: what the proxy sees on its 15001 listener. The peer of an accepted
 * connection is 127.0.0.1:<app local port> in the same netns, so (netns cookie, app local port)
 * identifies it. local_port is in host byte order. */
struct nm_tuple_key {
    __u64 netns_cookie;
    __u32 local_port;
    __u32 pad;
};

/* pod_by_netns: netns cookie (u64) -> nm_pod_info. Writer: agent (enroll/unenroll).
 * Readers: connect4, sockops, getpeername4 (is this socket's netns an enrolled pod?). */
BPF_HASH(pod_by_netns, __u64, struct nm_pod_info, NM_MAX_PODS);

/* orig_dst_by_cookie: socket cookie (u64) -> nm_orig_dst. Writer: connect4 (insert), sockops
 * (delete on close), agent (delete on unenroll is not possible by netns; LRU ages them out).
 * Readers: sockops (re-key), getpeername4 (restore). */
BPF_TABLE("lru_hash", __u64, struct nm_orig_dst, orig_dst_by_cookie, NM_MAX_CONNS);

/* orig_dst_by_tuple: nm_tuple_key -> nm_orig_dst. Writer: sockops (insert at TCP_CONNECT_CB,
 * delete at close), agent (delete by netns cookie on unenroll). Reader: agent relay on accept
 * from 15001 (original_destination). */
BPF_TABLE("lru_hash", struct nm_tuple_key, struct nm_orig_dst, orig_dst_by_tuple, NM_MAX_CONNS);

/* inbound_listener: pod IPv4 (u32, network byte order) -> the pod's 15006 listening socket.
 * Writer: agent (enroll: update with the socket fd; the kernel removes it when the socket
 * closes). Reader: sk_lookup. Keyed by pod IP, not netns cookie: bpf_get_netns_cookie is not
 * offered to sk_lookup programs, and the destination IP of an inbound SYN is the pod IP, unique
 * per node. */
BPF_TABLE("sockhash", __u32, __u32, inbound_listener, NM_MAX_PODS);

/* counters: index (u32) -> u64. Writers: every program. Reader: agent (counters()). */
BPF_ARRAY(counters, __u64, NM_NUM_COUNTERS);

/* bcc's helpers.h declares bpf_get_socket_cookie returning u32 (truncated): use a u64 variant. */
#define nm_get_socket_cookie(ctx) (((__u64(*)(void *))BPF_FUNC_get_socket_cookie)(ctx))

#endif /* NODEMESH_H */
