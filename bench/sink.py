"""Upload sink for the benchmark: a raw asyncio HTTP/1.1 server that reads every
request body to the end (Content-Length or chunked), discards it, and answers
200 with ``{"received": N}`` -- N being the body bytes it counted.

nginx cannot be the sink on its own: ``return 200`` answers before the body has
been read (the body is discarded afterwards, so a proxy may see the reply
mid-upload), and the modules that do read a body first spool it to a temp
file.  This sink is only protocol bookkeeping around ``len(data)``; with uvloop
it takes a few per cent of a core at 1 GB/s, and it costs every target alike.

    python bench/sink.py --listen 127.0.0.1:8002
"""
import argparse
import asyncio

MAX_HEAD = 65536


class Sink(asyncio.Protocol):
    def connection_made(self, transport):
        self.t = transport
        self.buf = bytearray()
        self.state = "head"
        self.remaining = 0
        self.total = 0
        self.close = False

    def data_received(self, data):
        # fast path: body bytes with nothing buffered are only counted
        if self.state in ("body", "chunk") and not self.buf:
            n = min(len(data), self.remaining)
            self.remaining -= n
            self.total += n
            if n == len(data):
                if not self.remaining:
                    self._body_part_done()
                return
            data = data[n:]
            if not self.remaining:
                self._body_part_done()
        self.buf += data
        self._process()

    def _body_part_done(self):
        if self.state == "body":
            self._finish()
        else:
            self.state = "chunk_crlf"

    def _process(self):
        buf = self.buf
        for _ in range(1_000_000):
            if self.state == "head":
                i = buf.find(b"\r\n\r\n")
                if i < 0:
                    if len(buf) > MAX_HEAD:
                        self.t.close()
                    return
                lines = bytes(buf[:i]).decode("latin-1").split("\r\n")
                del buf[:i + 4]
                headers = {}
                for line in lines[1:]:
                    k, _, v = line.partition(":")
                    headers[k.strip().lower()] = v.strip().lower()
                self.close = "close" in headers.get("connection", "") or lines[0].endswith("1.0")
                self.total = 0
                if headers.get("expect") == "100-continue":
                    self.t.write(b"HTTP/1.1 100 Continue\r\n\r\n")
                if "chunked" in headers.get("transfer-encoding", ""):
                    self.state = "chunk_size"
                elif int(headers.get("content-length", "0") or 0) > 0:
                    self.state, self.remaining = "body", int(headers["content-length"])
                else:
                    self._finish()
            elif self.state in ("body", "chunk"):
                n = min(len(buf), self.remaining)
                del buf[:n]
                self.remaining -= n
                self.total += n
                if self.remaining:
                    return
                self._body_part_done()
            elif self.state == "chunk_size":
                i = buf.find(b"\r\n")
                if i < 0:
                    return
                size = int(bytes(buf[:i]).split(b";")[0].strip(), 16)
                del buf[:i + 2]
                self.state, self.remaining = ("trailer", 0) if size == 0 else ("chunk", size)
            elif self.state == "chunk_crlf":
                if len(buf) < 2:
                    return
                del buf[:2]
                self.state = "chunk_size"
            elif self.state == "trailer":
                i = buf.find(b"\r\n")
                if i < 0:
                    return
                empty = i == 0
                del buf[:i + 2]
                if empty:
                    self._finish()
            if not buf and self.state == "head":
                return

    def _finish(self):
        body = b'{"received": %d}' % self.total
        self.t.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n%s\r\n%s"
                     % (len(body), b"Connection: close\r\n" if self.close else b"", body))
        self.state = "head"
        if self.close:
            self.t.close()


async def serve(host, port):
    server = await asyncio.get_running_loop().create_server(Sink, host, port, backlog=1024)
    async with server:
        await server.serve_forever()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--listen", default="127.0.0.1:8002")
    a = ap.parse_args()
    try:
        from uvloop import run
    except ImportError:
        run = asyncio.run
    host, _, port = a.listen.rpartition(":")
    try:
        run(serve(host, int(port)))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
