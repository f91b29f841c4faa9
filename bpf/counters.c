/* Counter increment shared by every program. It lives in a .c file, not the header, because
 * bcc rewrites map accesses (counters.lookup) only in the main compilation text; the loader
 * concatenates counters.c, sock_addr.c, sockops.c, sk_lookup.c into that text. */
#include "include/nodemesh.h"

static __always_inline void nm_count(__u32 idx)
{
    __u64 *v = counters.lookup(&idx);
    if (v)
        __sync_fetch_and_add(v, 1);
}
