"""The baseline Sluice must beat: a straightforward aiohttp proxy that makes one atomic Lua call
per request with redis-py's asyncio client (the way most tutorials write it)."""

import sys
import time

import redis.asyncio as aioredis
import uvloop
from aiohttp import ClientSession, web

SCRIPT = """
local tokens_key = KEYS[1]
local ts_key = KEYS[2]
local rate = tonumber(ARGV[1])
local capacity = tonumber(ARGV[2])
local now = tonumber(ARGV[3])
local requested = tonumber(ARGV[4])
local fill_time = capacity / rate
local ttl = math.floor(fill_time * 2)
local last_tokens = tonumber(redis.call("get", tokens_key))
if last_tokens == nil then last_tokens = capacity end
local last_refreshed = tonumber(redis.call("get", ts_key))
if last_refreshed == nil then last_refreshed = 0 end
local delta = math.max(0, now - last_refreshed)
local filled_tokens = math.min(capacity, last_tokens + (delta * rate))
local allowed = filled_tokens >= requested
local new_tokens = filled_tokens
if allowed then new_tokens = filled_tokens - requested end
redis.call("setex", tokens_key, ttl, new_tokens)
redis.call("setex", ts_key, ttl, now)
return { allowed and 1 or 0, new_tokens }
"""


async def make_app(upstream: str, redis_url: str) -> web.Application:
    r = aioredis.from_url(redis_url)
    script = r.register_script(SCRIPT)
    session = ClientSession()

    async def handle(request: web.Request) -> web.StreamResponse:
        key = request.headers.get("X-API-Key", request.remote or "")
        allowed, _ = await script(keys=[f"rl:{{{key}}}:t", f"rl:{{{key}}}:ts"],
                                  args=[1_000_000, 1_000_000, time.time(), 1])
        if not allowed:
            return web.Response(status=429, text="Too Many Requests")
        async with session.request(request.method, upstream + request.path_qs,
                                   data=await request.read()) as up:
            return web.Response(status=up.status, body=await up.read())

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    return app


if __name__ == "__main__":
    port, upstream, redis_url = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    loop = uvloop.new_event_loop()
    app = loop.run_until_complete(make_app(upstream, redis_url))
    web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None, loop=loop)
