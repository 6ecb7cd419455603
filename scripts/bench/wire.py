"""A counting TCP relay for the queue benchmark's cost table: sits between the platform and
PostgreSQL or Redis on loopback and counts the bytes each way and the statements (PostgreSQL
Execute and simple Query messages) or commands (Redis RESP arrays) the clients send. It relays
in a thread of its own, so its slowness shows only in rates, which the cost run does not report.
"""

import asyncio, struct, threading

SSL_REQUEST, GSSENC_REQUEST = 80877103, 80877104


class Counts:
    def __init__(self):
        self.sent = self.received = self.requests = 0


def pg_requests(buf, state):
    """Consumes whole frontend messages from `buf`; returns the Execute/Query count."""
    n = 0
    while True:
        if state["startup"]:
            if len(buf) < 8:
                return n
            length, code = struct.unpack("!ii", buf[:8])
            if len(buf) < length:
                return n
            del buf[:length]
            state["startup"] = code in (SSL_REQUEST, GSSENC_REQUEST)
            continue
        if len(buf) < 5:
            return n
        kind, length = buf[:1], struct.unpack("!i", buf[1:5])[0]
        if len(buf) < 1 + length:
            return n
        del buf[:1 + length]
        n += kind in (b"E", b"Q")


def redis_requests(buf, state):
    """Consumes whole RESP command arrays from `buf`; returns how many."""
    n = 0
    while True:
        if not buf.startswith(b"*"):
            end = buf.find(b"\r\n")  # an inline command
            if end < 0:
                return n
            del buf[:end + 2]
            n += 1
            continue
        end = buf.find(b"\r\n")
        if end < 0:
            return n
        args, pos = int(buf[1:end]), end + 2
        for _ in range(args):
            end = buf.find(b"\r\n", pos)
            if end < 0:
                return n
            pos = end + 2 + int(buf[pos + 1:end]) + 2
            if pos > len(buf):
                return n
        del buf[:pos]
        n += 1


class Relay:
    """Listens on 127.0.0.1:`port` and relays to 127.0.0.1:`upstream`; `protocol` is
    "postgres" or "redis"."""

    def __init__(self, port, upstream, protocol):
        self.port, self.upstream = port, upstream
        self.parse = pg_requests if protocol == "postgres" else redis_requests
        self.counts = Counts()
        self.ready = threading.Event()
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_until_complete, args=(self.serve(),), daemon=True).start()
        self.ready.wait()

    async def serve(self):
        server = await asyncio.start_server(self.relay, "127.0.0.1", self.port)
        self.ready.set()
        async with server:
            await server.serve_forever()

    async def relay(self, client_r, client_w):
        try:
            server_r, server_w = await asyncio.open_connection("127.0.0.1", self.upstream)
        except OSError:
            client_w.close()
            return
        state, pending = {"startup": True}, bytearray()

        async def up():
            while data := await client_r.read(65536):
                self.counts.sent += len(data)
                pending.extend(data)
                self.counts.requests += self.parse(pending, state)
                server_w.write(data)
                await server_w.drain()
            server_w.close()

        async def down():
            while data := await server_r.read(65536):
                self.counts.received += len(data)
                client_w.write(data)
                await client_w.drain()
            client_w.close()

        await asyncio.gather(up(), down(), return_exceptions=True)

    def reset(self):
        self.counts = Counts()
