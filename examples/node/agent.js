#!/usr/bin/env node
// The pricing specialist as a hivemesh agent in Node.js: it serves `hivemesh.v1.Agent` in plaintext on loopback
// and nothing else. `hivemesh sidecar --agent 127.0.0.1:PORT` in front of it does the mesh's work (mutual TLS,
// tokens, authorization, input validation against the card's schema, audit, registration).
//
// It serves `Agent.Link` too (lib/linkserver.js): the sidecar then sends it each unary call as a frame on one
// stream, answered by the same code as `Invoke`; each answer's metadata says how the call arrived, and how many
// calls this agent stopped before finishing them (their deadline passed or they were cancelled).
//
//   node agent.js [--port 0] [--catalogue catalogue.json] [--name pricing] [--delay-ms 0]
//   prints "listening 127.0.0.1:PORT" once serving; SIGTERM/SIGINT stop it. --delay-ms makes every unary quote
//   take that long (stopped early by its deadline or cancel, counted in "stopped"), to watch deadlines and
//   cancels at work.
'use strict';

const fs = require('node:fs');
const path = require('node:path');
const { parseArgs } = require('node:util');
const { grpc, loadHivemesh } = require('./lib/contracts');
const { linkHandler } = require('./lib/linkserver');
const { richError } = require('./lib/richstatus');
const { INPUT_SCHEMA, OUTPUT_SCHEMA, QuoteError, quote, quoteAll } = require('./lib/pricing');

const CAPABILITY = 'pricing.quote';
const JSON_TYPE = 'application/json';

const { values: args } = parseArgs({
  options: {
    port: { type: 'string', default: '0' },
    catalogue: { type: 'string', default: path.join(__dirname, 'catalogue.json') },
    name: { type: 'string', default: 'pricing' },
    'delay-ms': { type: 'string', default: '0' },
  },
});

const hivemesh = loadHivemesh();
const catalogue = JSON.parse(fs.readFileSync(args.catalogue, 'utf8'));

const card = {
  name: args.name,
  version: '1.0.0',
  description: 'Pricing specialist of the sales-support team: quotes from the catalogue, with tier discounts.',
  owner: 'sales-support',
  labels: { language: 'node' },
  capabilities: [{
    name: CAPABILITY,
    description: 'Quote a price for catalogue items: each line (volume discount from '
      + `${catalogue.volume_discount.min_quantity} units) then the total with the customer tier's discount. `
      + 'InvokeStream sends {"line": …} per item, then {"total": …}.',
    input_schema: JSON.stringify(INPUT_SCHEMA),
    output_schema: JSON.stringify(OUTPUT_SCHEMA),
    // Unary is the natural call (the whole quote, checked against output_schema by the sidecar); InvokeStream
    // is offered too, with line and total items. A capability marked streaming declares its item schema instead.
    streaming: false,
    idempotent: true, // a quote has no side effect: safe to retry
    tags: ['sales', 'pricing'],
    input_modes: [JSON_TYPE],
    output_modes: [JSON_TYPE],
  }],
};

const delayMs = Number(args['delay-ms']);
let links = 0; // Link streams opened so far (the sidecar keeps one open while it can)
let stopped = 0; // calls given up before their answer was made: deadline passed or cancelled, by either transport

/**
 * What every answer says about the call: the W3C trace it belongs to, who called (set by the sidecar), how it
 * arrived ("unary" Invoke or a "link" frame, with the links opened so far), and the calls stopped so far (so a
 * caller can see that a call it gave up did not run on here). header(key) reads its metadata.
 */
function callNotes(header, arrived) {
  const notes = { arrived, stopped: String(stopped) };
  if (arrived === 'link') notes.links = String(links);
  const traceparent = header('traceparent');
  if (traceparent) notes.traceparent = String(traceparent);
  const caller = header('x-hivemesh-caller');
  if (caller) notes.caller = String(caller);
  return notes;
}

/** Resolves after ms, or rejects as soon as signal aborts (the call's deadline passed or it was cancelled). */
function pause(ms, signal) {
  return new Promise((resolve, reject) => {
    if (signal.aborted) { reject(signal.reason); return; }
    const timer = setTimeout(resolve, ms);
    signal.addEventListener('abort', () => { clearTimeout(timer); reject(signal.reason); }, { once: true });
  });
}

/** The request's input as JSON; every refusal is INVALID_ARGUMENT with reason INVALID_INPUT and the fields. */
function parseInput(request) {
  if (request.capability !== CAPABILITY) {
    throw richError(grpc.status.NOT_FOUND, `this agent serves ${CAPABILITY}, not ${request.capability}`,
      'UNKNOWN_CAPABILITY');
  }
  try {
    return JSON.parse(request.input.toString('utf8'));
  } catch (e) {
    throw richError(grpc.status.INVALID_ARGUMENT, `the input is not JSON: ${e.message}`, 'INVALID_INPUT',
      { input: 'not valid JSON' });
  }
}

function refusal(e) {
  if (e instanceof QuoteError) return richError(grpc.status.INVALID_ARGUMENT, e.message, 'INVALID_INPUT', e.violations);
  if (e && e.metadata instanceof grpc.Metadata) return e; // already a rich status
  console.error('pricing: bug:', e);
  return richError(grpc.status.INTERNAL, `pricing failed: ${e && e.message}`, 'AGENT_ERROR');
}

/**
 * One unary call, however it arrived (Invoke or a Link frame): resolves to the InvokeResponse or rejects with
 * the rich error both transports send. header(key) reads the call's metadata; signal aborts it.
 */
async function invoke(request, header, arrived, signal) {
  try {
    const order = parseInput(request);
    if (delayMs > 0) await pause(delayMs, signal);
    return {
      output: Buffer.from(JSON.stringify(quoteAll(order, catalogue))), content_type: JSON_TYPE,
      state: 'TASK_STATE_COMPLETED', metadata: callNotes(header, arrived),
    };
  } catch (e) {
    if (!signal.aborted) throw refusal(e);
    stopped += 1;
    throw e; // a stopped call is answered by its transport, if at all
  }
}

/** The first value of a unary call's metadata key, as a string (or undefined). */
function unaryHeader(call) {
  return (key) => {
    const [value] = call.metadata.get(key);
    return value === undefined ? undefined : String(value);
  };
}

const link = linkHandler(hivemesh.Agent.service.Invoke,
  (request, header, signal) => invoke(request, header, 'link', signal), { onLink: () => { links += 1; } });
const server = new grpc.Server();
server.addService(hivemesh.Agent.service, {
  Describe(_call, callback) {
    callback(null, card);
  },
  Invoke(call, callback) {
    const controller = new AbortController(); // grpc-js answers the caller itself on deadline or cancel
    call.on('cancelled', () => controller.abort());
    invoke(call.request, unaryHeader(call), 'unary', controller.signal).then(
      (response) => callback(null, response),
      (err) => { if (!controller.signal.aborted) callback(err); },
    );
  },
  Link: link,
  InvokeStream(call) {
    let parts;
    try {
      parts = [...quote(parseInput(call.request), catalogue)]; // checks everything before the first chunk
    } catch (e) {
      call.destroy(refusal(e));
      return;
    }
    parts.forEach((part, i) => {
      const final = i === parts.length - 1;
      call.write({
        data: Buffer.from(JSON.stringify(part)), content_type: JSON_TYPE, final,
        state: final ? 'TASK_STATE_COMPLETED' : 'TASK_STATE_WORKING',
      });
    });
    call.end();
  },
});

server.bindAsync(`127.0.0.1:${args.port}`, grpc.ServerCredentials.createInsecure(), (err, port) => {
  if (err) {
    console.error(`pricing: cannot listen on 127.0.0.1:${args.port}: ${err.message}`);
    process.exit(1);
  }
  process.stdout.write(`listening 127.0.0.1:${port}\n`);
});

for (const signal of ['SIGINT', 'SIGTERM']) {
  process.on(signal, () => {
    setTimeout(() => process.exit(0), 5000).unref(); // calls still open after 5 s are cut
    server.tryShutdown(() => process.exit(0));
    link.drain(); // the sidecar keeps its link open: end it once its calls are answered
  });
}
