#!/usr/bin/env python3
"""Plain durable FastAGI: the floor of the durable work, for `make bench`.

As bench/minimal_fastagi.py, plus the work any masking service must do: one indexed read
per route (X's active binding) and one committed insert per hangup (the call's record),
written plainly with asyncpg. What callctl costs above this is callctl's own.
usage: floor_fastagi.py HOST:PORT DSN [DEST]
"""
import asyncio, sys
import asyncpg

LISTEN, DSN = sys.argv[1], sys.argv[2]
DEST = sys.argv[3] if len(sys.argv) > 3 else "+8613800000001"
READ = ("SELECT b.id, b.party_a FROM virtual_numbers v JOIN bindings b ON b.number_id = v.id "
        "AND b.status = 'active' WHERE v.e164 = $1")
WRITE = "INSERT INTO floor_cdrs (call_id, x, args) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING"


async def handle(reader, writer, pool):
    try:
        env = {}
        while (line := await reader.readline()) not in (b"\n", b""):
            k, _, v = line.decode(errors="replace").partition(":")
            env[k] = v.strip()
        if env.get("agi_network_script") == "route":
            found = await pool.fetchrow(READ, env.get("agi_extension"))
            answer = [("CALLCTL_ACTION", "bridge"), ("CALLCTL_DEST", DEST)] if found else \
                     [("CALLCTL_ACTION", "reject"), ("CALLCTL_REASON", "unknown_number")]
            commands = [f'EXEC MSet "{",".join(f"{k}={v}" for k, v in answer)}"\n'.encode()]
        else:
            args = " ".join(env[f"agi_arg_{i}"] for i in range(1, 100) if f"agi_arg_{i}" in env)
            await pool.execute(WRITE, env.get("agi_uniqueid"), env.get("agi_extension"), args)
            commands = [b'SET VARIABLE CALLCTL_CDR "written"\n']
        for command in commands:  # one at a time: res_agi loses pipelined commands
            writer.write(command)
            await reader.readline()
    finally:
        writer.close()


async def main():
    pool = await asyncpg.create_pool(DSN, min_size=2, max_size=4)
    await pool.execute("CREATE TABLE IF NOT EXISTS floor_cdrs (call_id text PRIMARY KEY, x text, args text, "
                       "at timestamptz DEFAULT now())")
    host, port = LISTEN.rsplit(":", 1)
    server = await asyncio.start_server(lambda r, w: handle(r, w, pool), host, int(port), backlog=1024)
    async with server:
        await server.serve_forever()

asyncio.run(main())
