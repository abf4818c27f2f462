// The stack most tutorials use: Express, rate-limiter-flexible's RateLimiterRedis (one Lua
// call per request through ioredis), and a keep-alive http.request proxy to the upstream.
// Usage: node server.js PORT UPSTREAM_URL REDIS_URL
const express = require('express');
const http = require('http');
const Redis = require('ioredis');
const { RateLimiterRedis } = require('rate-limiter-flexible');

const [port, upstream, redisUrl] = process.argv.slice(2);
const up = new URL(upstream);
const agent = new http.Agent({ keepAlive: true, maxSockets: 1024 });
const redis = new Redis(redisUrl);
const limiter = new RateLimiterRedis({ storeClient: redis, points: 1000000, duration: 1, keyPrefix: 'rlflx' });

const app = express();
app.disable('x-powered-by');
app.use(async (req, res) => {
  try {
    await limiter.consume(req.get('X-API-Key') || req.ip);
  } catch (rejection) {
    res.status(rejection instanceof Error ? 503 : 429).end();
    return;
  }
  const proxied = http.request({
    host: up.hostname, port: up.port, path: req.originalUrl, method: req.method,
    headers: req.headers, agent,
  }, (upRes) => {
    res.writeHead(upRes.statusCode, upRes.headers);
    upRes.pipe(res);
  });
  proxied.on('error', () => res.status(502).end());
  req.pipe(proxied);
});

redis.once('ready', () => app.listen(Number(port), '127.0.0.1'));
