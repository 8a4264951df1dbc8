// Serving `Agent.Link` (agent.proto): many unary Invokes, tagged by id, on one long-lived bidi stream. Each call
// frame runs through the agent's own Invoke function and is answered in its own frame with exactly the status,
// message and trailers (the rich error model's `grpc-status-details-bin`) a unary Invoke would have sent.
//
// The simplest correct server: it announces no batches (so it is never sent one, and answers one frame per
// message), though it reads a batch frame by frame if one comes; answers go back in the order calls finish.
'use strict';

const { grpc } = require('./contracts');
const { richError } = require('./richstatus');

function answerOfError(err) {
  // Not a grpc-js status (a bug in the handler): INTERNAL, as grpc-js answers a unary handler that throws.
  const code = Number.isInteger(err.code) ? err.code : grpc.status.INTERNAL;
  const answer = { code, message: err.details || err.message || '', trailers: [], binary_trailers: [] };
  const entries = err.metadata instanceof grpc.Metadata ? Object.entries(err.metadata.getMap()) : [];
  for (const [key, value] of entries) {
    if (Buffer.isBuffer(value)) answer.binary_trailers.push({ key, value });
    else answer.trailers.push({ key, value: String(value) });
  }
  return answer;
}

/**
 * A grpc-js bidi handler for `Link`. invoke(request, header, signal) is the unary Invoke's own logic: it returns
 * (or resolves to) an InvokeResponse object or throws a grpc-js error ({code, details, metadata}); header(key)
 * reads the frame's metadata; signal aborts on the frame's deadline (timeout_s), its cancel frame or the
 * stream's end. method is the unary method definition (`Agent.service.Invoke`) whose (de)serializers the
 * frames' request and response bytes use. onLink() is told of each Link stream opened.
 */
function linkHandler(method, invoke, { onLink = () => {} } = {}) {
  const open = new Set(); // each open link's drain()
  function Link(stream) {
    onLink();
    const running = new Map(); // call id -> AbortController, while the call may still be answered
    let halfClosed = false;

    const endIfDone = () => {
      if (halfClosed && running.size === 0 && stream.writable) stream.end();
    };
    const drain = () => { halfClosed = true; endIfDone(); };
    open.add(drain);
    stream.on('close', () => open.delete(drain));

    const answer = (id, controller, body) => {
      if (running.get(id) !== controller) return; // cancelled, expired or already answered
      running.delete(id);
      if (stream.writable) stream.write({ id, answer: body });
      endIfDone();
    };

    const decode = (bytes) => {
      try {
        return method.requestDeserialize(bytes);
      } catch (e) { // Mesh.Link answers undecodable request bytes the same way
        throw richError(grpc.status.INVALID_ARGUMENT, `the call frame's request is not an InvokeRequest: ${
          e.message}`, 'INVALID_INPUT', { request: 'not a serialized InvokeRequest' });
      }
    };

    const run = async (frame) => {
      const { id, call } = frame;
      const controller = new AbortController();
      running.get(id)?.abort(); // a reused open id replaces the old call (a caller that broke the protocol)
      running.set(id, controller);
      const headers = new Map(call.metadata.map((h) => [h.key, h.value]));
      let timer = null;
      if (call.timeout_s > 0) {
        timer = setTimeout(() => {
          answer(id, controller, { code: grpc.status.DEADLINE_EXCEEDED, message: 'Deadline Exceeded' });
          controller.abort();
        }, call.timeout_s * 1000);
      }
      try {
        const response = await invoke(decode(call.request), (key) => headers.get(key), controller.signal);
        answer(id, controller, { code: grpc.status.OK, response: method.responseSerialize(response) });
      } catch (err) {
        if (!controller.signal.aborted) answer(id, controller, answerOfError(err));
      } finally {
        clearTimeout(timer);
      }
    };

    const cancel = (id) => {
      const controller = running.get(id);
      if (controller === undefined) return; // answered already: nothing to stop
      running.delete(id);
      controller.abort();
      endIfDone();
    };

    stream.on('data', (message) => {
      for (const frame of message.batch.length ? message.batch : [message]) {
        if (frame.body === 'call') run(frame);
        else if (frame.body === 'cancel' && frame.cancel) cancel(frame.id);
      }
    });
    stream.on('end', drain); // answer what is open, then end
    const stopAll = () => {
      for (const controller of running.values()) controller.abort();
      running.clear();
    };
    stream.on('cancelled', stopAll);
    stream.on('error', stopAll);
  }
  /** Shutting down: every open link ends once its open calls are answered (the sidecar opens a new one). */
  Link.drain = () => { for (const drain of [...open]) drain(); };
  return Link;
}

module.exports = { linkHandler };
