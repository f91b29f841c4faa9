"""An independent HTTP/2 CONNECT client for tests: a blocking socket, `ssl` and bare `h2`, none of
nodemesh's I/O code (what any HBONE client could send)."""

from __future__ import annotations

import socket
import ssl

import h2.config
import h2.connection
import h2.events


def h2_connect(
    addr: tuple[str, int],
    ctx: ssl.SSLContext,
    authority: str,
    message: bytes,
    extra_headers: tuple[tuple[str, str], ...] = (),
) -> tuple[int, bytes]:
    """An independent HTTP/2 client: blocking socket + ssl + bare h2, none of nodemesh's I/O code."""
    with socket.create_connection(addr, timeout=5) as raw, ctx.wrap_socket(raw, server_hostname=None) as s:
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        conn.initiate_connection()
        conn.send_headers(1, [(":method", "CONNECT"), (":authority", authority), *extra_headers])
        s.sendall(conn.data_to_send())
        status, body, sent = 0, bytearray(), False
        while True:
            data = s.recv(65536)
            if not data:
                break
            done = False
            for ev in conn.receive_data(data):
                if isinstance(ev, h2.events.ResponseReceived):
                    status = int(dict(ev.headers)[b":status"])
                    if status == 200 and not sent:
                        conn.send_data(1, message, end_stream=True)
                        sent = True
                elif isinstance(ev, h2.events.DataReceived):
                    body += ev.data
                    conn.acknowledge_received_data(ev.flow_controlled_length, 1)
                elif isinstance(ev, h2.events.StreamEnded | h2.events.StreamReset):
                    done = True
            s.sendall(conn.data_to_send())
            if done:
                break
        return status, bytes(body)
