#!/usr/bin/env node
// A Node.js program calling mesh capabilities by name through a caller-only sidecar (`hivemesh sidecar --client
// NAME`), which joined the mesh as client NAME and serves `hivemesh.v1.Mesh` on a private Unix socket. The
// program itself holds no certificate and no token: plain gRPC to the socket.
//
//   node caller.js --mesh unix:/path/to/mesh.sock --capability pricing.quote --input '{"customer_tier": ...}'
//                  [--stream | --link] [--timeout-ms 10000] [--retries 3] [--idempotency-key KEY]
//
// Prints one JSON line: {"ok": true, "output" | "chunks", ...} or {"ok": false, "error": {code, reason,
// violations, retry_delay_ms, pushback_ms, ...}}; exits 0 or 1. It generates a W3C traceparent (one trace id for
// every attempt), keeps one idempotency key across retries, retries only what the mesh says may be retried,
// after the delay the mesh asked for (`grpc-retry-pushback-ms`, else RetryInfo), and never past its deadline.
// With --link (or HIVEMESH_CALLER_LINK=1) every attempt is a frame on one `Mesh.Link` stream (lib/linkclient.js)
// instead of a unary Mesh.Call: same answers, same refusals, same retries; the output's "via" says which, and
// "link": {opened, answers} counts the links opened and the answer frames they brought back. A sidecar that
// serves no Mesh.Link (HIVEMESH_LINK=0) refuses the stream UNIMPLEMENTED: the calls then go unary ("via": "call").
'use strict';

const crypto = require('node:crypto');
const { parseArgs } = require('node:util');
const { grpc, loadHivemesh } = require('./lib/contracts');
const { MeshLinks } = require('./lib/linkclient');
const { readError } = require('./lib/richstatus');

const { values: args } = parseArgs({
  options: {
    mesh: { type: 'string' },
    capability: { type: 'string' },
    input: { type: 'string', default: '{}' },
    stream: { type: 'boolean', default: false },
    link: { type: 'boolean', default: ['1', 'true', 'on'].includes(process.env.HIVEMESH_CALLER_LINK || '') },
    'timeout-ms': { type: 'string', default: '10000' },
    retries: { type: 'string', default: '3' },
    'idempotency-key': { type: 'string' },
  },
});
if (!args.mesh || !args.capability || (args.stream && args.link)) {
  console.error('usage: node caller.js --mesh unix:PATH --capability NAME [--input JSON] [--stream | --link] '
    + '[--timeout-ms N] [--retries N] [--idempotency-key KEY]\n'
    + '  (--link carries unary calls only: a --stream call is a CallStream of its own)');
  process.exit(2);
}

// Codes after which the call may be sent again: the mesh only refused it for now (RESOURCE_EXHAUSTED: rate limit
// or overload) or could not reach an instance (UNAVAILABLE); never a refusal on the merits (INVALID_ARGUMENT...).
const RETRYABLE = new Set([grpc.status.UNAVAILABLE, grpc.status.RESOURCE_EXHAUSTED]);

/** A W3C trace context: version 00, a trace id for the whole call, a span id per attempt, sampled. */
function traceparent(traceId) {
  return `00-${traceId}-${crypto.randomBytes(8).toString('hex')}-01`;
}

function decodeJson(buf) {
  const text = Buffer.from(buf).toString('utf8');
  try { return JSON.parse(text); } catch { return text; }
}

const sleep = (ms) => new Promise((resolve) => { setTimeout(resolve, ms); });

function answer(resp) {
  return {
    output: decodeJson(resp.output), state: resp.state, metadata: resp.metadata,
    hops: resp.hops.map((h) => ({ kind: h.kind, identity: h.identity })),
  };
}

/** One attempt: on a link (headers as frame metadata), as a unary Call, or as a CallStream. */
async function once(mesh, links, request, headers, deadline) {
  if (links !== null && !links.unsupported) {
    try {
      return answer(await links.call(request, headers, deadline));
    } catch (err) {
      if (!links.unsupported) throw err; // else the sidecar serves no Mesh.Link: nothing ran, send it unary
    }
  }
  const metadata = new grpc.Metadata();
  for (const [key, value] of Object.entries(headers)) metadata.set(key, value);
  if (!args.stream) {
    return new Promise((resolve, reject) => {
      mesh.Call(request, metadata, { deadline }, (err, resp) => (err ? reject(err) : resolve(answer(resp))));
    });
  }
  return new Promise((resolve, reject) => {
    const chunks = [];
    let hops = [];
    const call = mesh.CallStream(request, metadata, { deadline });
    call.on('data', (chunk) => {
      chunks.push(decodeJson(chunk.data));
      if (chunk.final) hops = chunk.hops.map((h) => ({ kind: h.kind, identity: h.identity }));
    });
    call.on('error', reject);
    call.on('end', () => resolve({ chunks, hops }));
  });
}

async function main() {
  const hivemesh = loadHivemesh();
  // A 1 MiB stream window: a link's answers share one HTTP/2 stream (docs/any-language.md, "Stream window").
  const mesh = new hivemesh.Mesh(args.mesh, grpc.credentials.createInsecure(),
    { 'grpc-node.flow_control_window': 1024 * 1024 });
  // A link opens on the first attempt and again after it broke (an attempt may then be retried on the new one).
  const links = args.link ? new MeshLinks(mesh, hivemesh.Mesh.service.Call) : null;
  const via = () => {
    if (links !== null && !links.unsupported) return 'link';
    return args.stream ? 'stream' : 'call';
  };
  const timeoutMs = Number(args['timeout-ms']);
  const deadline = Date.now() + timeoutMs; // one deadline for all attempts; the mesh passes the rest on
  const retries = Number(args.retries);
  const traceId = crypto.randomBytes(16).toString('hex');
  const idempotencyKey = args['idempotency-key'] || crypto.randomUUID();
  const request = {
    capability: args.capability,
    input: Buffer.from(args.input),
    content_type: 'application/json',
    // The same key on every attempt: an agent that already did the work answers without doing it twice.
    context: { call_id: crypto.randomUUID(), idempotency_key: idempotencyKey },
  };
  try {
    const result = await attempts({ mesh, links, request, deadline, retries, traceId });
    // What came back as answer frames: every attempt's answer, on as few links as the stream allowed.
    return { ...result, via: via(), ...(links === null ? {} : { link: links.stats() }) };
  } finally {
    if (links !== null) links.end();
  }
}

/** Every attempt of one logical call until one is answered, refused for good, or out of retries or time. */
async function attempts({ mesh, links, request, deadline, retries, traceId }) {
  const waits = [];
  for (let attempt = 1; ; attempt += 1) {
    const tp = traceparent(traceId);
    const done = { attempts: attempt, waits_ms: waits, traceparent: tp, trace_id: traceId };
    try {
      const result = await once(mesh, links, request, { traceparent: tp }, deadline);
      return { ok: true, ...result, ...done };
    } catch (err) {
      const error = readError(err);
      // Pushback first (gRFC A6: a negative or malformed one means "do not retry"), then RetryInfo.
      const delay = error.pushback_ms !== null ? error.pushback_ms : error.retry_delay_ms;
      const retryable = RETRYABLE.has(err.code) && delay !== -1;
      const wait = delay === null ? 100 * attempt : delay;
      if (!retryable || attempt > retries || Date.now() + wait >= deadline) {
        return { ok: false, error, ...done };
      }
      waits.push(wait);
      await sleep(wait);
    }
  }
}

main().then((result) => {
  process.stdout.write(`${JSON.stringify(result)}\n`);
  process.exit(result.ok ? 0 : 1);
}, (e) => {
  console.error('caller: bug:', e);
  process.exit(3);
});
