#!/usr/bin/env python3
"""A TCP round-robin balancer for `make stack`: each new connection on the
listening port goes to the next replica in turn, as a Kubernetes Service
spreads connections. Usage: round-robin.py LISTEN_PORT REPLICA_PORT..."""
import asyncio
import itertools
import sys


async def pipe(reader, writer):
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, asyncio.CancelledError):
        pass
    finally:
        writer.close()


async def main(listen, replicas):
    turn = itertools.cycle(replicas)

    async def handle(client_r, client_w):
        for _ in replicas:  # a replica that is down is skipped
            try:
                up_r, up_w = await asyncio.open_connection("127.0.0.1", next(turn))
                break
            except OSError:
                continue
        else:
            client_w.close()
            return
        await asyncio.gather(pipe(client_r, up_w), pipe(up_r, client_w))

    server = await asyncio.start_server(handle, "127.0.0.1", listen)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]), [int(p) for p in sys.argv[2:]]))
