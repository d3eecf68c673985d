#!/usr/bin/env python3
"""A scripted stand-in for llama-server, for fault injection only (memory blow-ups).

Answers /health and /v1/models on its --host unix socket like llama-server; a request whose body
contains "allocate" makes it eat memory until the kernel stops it; any other request gets a
small completion. `--help` lists enough options for the router to accept it as llama-server.
"""

import asyncio
import json
import sys

HELP = """-c,    --ctx-size N                     size of the prompt context
-a,    --alias STRING                   model name alias
-m,    --model FNAME                    model path
--host HOST                             listen address
-cram, --cache-ram N                    prompt cache size in MiB
"""


async def handle(reader, writer, alias):
    head = await reader.readuntil(b"\r\n\r\n")
    length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")), 0)
    body = await reader.readexactly(length) if length else b""
    path = head.split(b" ")[1].decode()
    if path == "/health":
        reply = {"status": "ok"}
    elif path.startswith("/v1/models"):
        reply = {"object": "list", "data": [{"id": alias, "object": "model"}]}
    elif b"allocate" in body:
        hoard = []
        while True:
            hoard.append(bytearray(8 << 20))  # zero-filled: every page is really touched
            await asyncio.sleep(0.01)
    else:
        reply = {"object": "chat.completion", "model": alias,
                 "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}]}
    data = json.dumps(reply).encode()
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n"
                 + f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
    await writer.drain()
    writer.close()


async def main(args):
    host, alias = args[args.index("--host") + 1], args[args.index("--alias") + 1]
    server = await asyncio.start_unix_server(lambda r, w: handle(r, w, alias), host)
    print(f"fake llama-server listening on {host}", flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    if "--help" in sys.argv:
        print(HELP)
    else:
        asyncio.run(main(sys.argv[1:]))
