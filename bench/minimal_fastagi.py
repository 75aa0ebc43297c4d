#!/usr/bin/env python3
"""Minimal FastAGI: the floor of AGI cost, for `make bench`.

route  -> SET VARIABLE CALLCTL_ACTION bridge + CALLCTL_DEST <dest> (or reject, with --reject)
hangup -> SET VARIABLE CALLCTL_CDR written, as callctl acknowledges a CDR (--verbose prints
          the key=value arguments)
usage: minimal_fastagi.py [HOST:PORT] [DEST] [--verbose] [--reject REASON]
"""
import argparse, asyncio

p = argparse.ArgumentParser()
p.add_argument("listen", nargs="?", default="127.0.0.1:4573")
p.add_argument("dest", nargs="?", default="+8613800000001")
p.add_argument("--verbose", "-v", action="store_true")
p.add_argument("--reject", metavar="REASON", help="answer reject/REASON instead of bridge")
a = p.parse_args()
ANSWER = [("CALLCTL_ACTION", "reject"), ("CALLCTL_REASON", a.reject)] if a.reject else \
         [("CALLCTL_ACTION", "bridge"), ("CALLCTL_DEST", a.dest)]
CMDS = [f'SET VARIABLE {k} "{v}"\n'.encode() for k, v in ANSWER]
ACK = [b'SET VARIABLE CALLCTL_CDR "written"\n']  # else the dialplan asks a second time


async def handle(reader, writer):
    try:
        env = {}
        while (line := await reader.readline()) not in (b"\n", b""):
            k, _, v = line.decode(errors="replace").partition(":")
            env[k] = v.strip()
        route = env.get("agi_network_script") == "route"
        if not route and a.verbose:
            args = [env[f"agi_arg_{i}"] for i in range(1, 100) if f"agi_arg_{i}" in env]
            print(env.get("agi_network_script"), env.get("agi_uniqueid"), " ".join(args), flush=True)
        for cmd in CMDS if route else ACK:  # one at a time: res_agi loses pipelined commands
            writer.write(cmd)
            await reader.readline()
    finally:
        writer.close()


async def main():
    host, port = a.listen.rsplit(":", 1)
    server = await asyncio.start_server(handle, host, int(port), backlog=1024)
    async with server:
        await server.serve_forever()

asyncio.run(main())
