"""The in-process Python API (`start_server` / `handle.stop()`) the drill engine uses."""
from __future__ import annotations

import asyncio

import aiohttp
import pytest

from halb.chaos.toxiproxy import start_server
from halb.chaos.toxiproxy.jsonbody import BodyError, Field, decode_first_value, decode_struct

pytestmark = pytest.mark.timeout(30)


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while data := await reader.read(65536):
        writer.write(data)
        await writer.drain()
    writer.close()


def test_start_and_stop_in_process() -> None:
    async def main() -> None:
        upstream = await asyncio.start_server(_echo, "127.0.0.1", 0)
        up_port = upstream.sockets[0].getsockname()[1]
        handle = await start_server("127.0.0.1", 0)
        try:
            async with aiohttp.ClientSession() as http:
                async with http.get(f"{handle.url}/version") as resp:
                    assert resp.status == 200
                async with http.post(f"{handle.url}/proxies", json={
                        "name": "e", "upstream": f"127.0.0.1:{up_port}", "listen": "127.0.0.1:0"}) as resp:
                    assert resp.status == 201
                    listen = (await resp.json())["listen"]
                async with http.post(f"{handle.url}/proxies/e/toxics",
                                     json={"type": "latency", "attributes": {"latency": 100}}) as resp:
                    assert resp.status == 200
            host, port = listen.rsplit(":", 1)
            reader, writer = await asyncio.open_connection(host, int(port))
            loop = asyncio.get_running_loop()
            start = loop.time()
            writer.write(b"hi")
            assert await asyncio.wait_for(reader.readexactly(2), 10) == b"hi"
            assert loop.time() - start >= 0.09
        finally:
            await handle.stop()
            upstream.close()
            await upstream.wait_closed()
        # stopping closed the live connection and the listener
        assert await asyncio.wait_for(reader.read(10), 10) == b""
        writer.close()
        with pytest.raises(OSError):
            await asyncio.open_connection(host, int(port))

    asyncio.run(main())


def test_go_json_rules() -> None:
    assert decode_first_value(b' {"a": 1} trailing') == [("a", 1)]
    with pytest.raises(BodyError, match="^EOF$"):
        decode_first_value(b"  \n")
    with pytest.raises(BodyError):
        decode_first_value(b"NaN")
    fields = [Field("name", "string"), Field("n", "int64")]
    assert decode_struct(decode_first_value(b'{"NAME": "x", "Name": "y", "n": null}'), "S", fields) == {"name": "y"}
    for bad in (b'{"n": 1.0}', b'{"n": "1"}', b'{"n": true}', b'{"name": 1}', b"[1]"):
        with pytest.raises(BodyError):
            decode_struct(decode_first_value(bad), "S", fields)
