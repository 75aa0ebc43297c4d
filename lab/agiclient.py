"""A FastAGI client that speaks as Asterisk's res_agi does: the environment, then an
answer to every command the daemon sends (SET VARIABLE, EXEC MSet). The fake Asterisk of
the daemon tests (tests/test_cdr_durability.py and those that import from it) and of
bench/paired_cpu.py."""
from __future__ import annotations

import asyncio


async def agi_session(port: int, script: str, uniqueid: str, args: list[str] = (), env: dict | None = None,
                      timeout: float = 15.0) -> dict[str, str] | None:
    """One FastAGI session as Asterisk runs it: the environment, then an answer to every
    SET VARIABLE and EXEC MSet. Returns the variables set, or None if the daemon was unreachable
    or the session broke off."""
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        return None
    lines = {"agi_network_script": script, "agi_request": f"agi://127.0.0.1:{port}/{script}",
             "agi_channel": "PJSIP/carrier-00000001", "agi_uniqueid": uniqueid, **(env or {})}
    lines.update({f"agi_arg_{n}": arg for n, arg in enumerate(args, 1)})
    variables: dict[str, str] = {}
    try:
        writer.write(b"".join(f"{k}: {v}\n".encode() for k, v in lines.items()) + b"\n")
        async with asyncio.timeout(timeout):
            while line := await reader.readline():
                command = line.decode().strip()
                if command.startswith("SET VARIABLE "):
                    name, _, value = command[13:].partition(" ")
                    variables[name] = value.strip('"')
                    writer.write(b"200 result=1\n")
                elif command.startswith("EXEC MSet "):
                    pairs = (pair.partition("=") for pair in command[10:].strip('"').split(","))
                    variables.update((name, value) for name, _, value in pairs)
                    writer.write(b"200 result=0\n")
                else:
                    writer.write(b"510 Invalid or unknown command\n")
        return variables
    except (OSError, asyncio.IncompleteReadError):
        return None
    finally:
        writer.close()
