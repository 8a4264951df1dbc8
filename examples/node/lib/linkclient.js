// Calling through `Mesh.Link` (mesh.proto): many Mesh.Calls as tagged frames on one long-lived bidi stream to the
// sidecar. Each answer becomes exactly what the unary call would have given: the InvokeResponse, or an error shaped
// like a grpc-js ServiceError ({code, details, metadata} with the answer's trailers, `grpc-status-details-bin`
// among them), so the caller's error handling (lib/richstatus.js readError, retries, pushback) cannot tell them
// apart. A call's deadline travels as timeout_s; at the deadline the call is given up locally with a cancel frame.
'use strict';

const { grpc } = require('./contracts');

function serviceError(code, details, metadata = new grpc.Metadata()) {
  return Object.assign(new Error(`${code} ${grpc.status[code] || ''}: ${details}`), { code, details, metadata });
}

function errorOfAnswer(answer) {
  const metadata = new grpc.Metadata();
  for (const { key, value } of answer.trailers) {
    try { metadata.add(key, value); } catch { /* a key grpc-js would not carry either */ }
  }
  for (const { key, value } of answer.binary_trailers) {
    try { metadata.add(key, Buffer.from(value)); } catch { /* idem */ }
  }
  return serviceError(answer.code, answer.message, metadata);
}

/** One Mesh.Link stream; it opens on construction. `broken` once the stream ended: open a new one. */
class MeshLink {
  /** mesh: a grpc-js `hivemesh.v1.Mesh` client; callMethod (`Mesh.service.Call`) (de)serializes the frames'
   * requests and responses. */
  constructor(mesh, callMethod) {
    this.method = callMethod;
    this.pending = new Map(); // call id -> {resolve, reject, timer}
    this.nextId = 1;
    this.broken = false;
    this.answers = 0;
    this.stream = mesh.Link();
    this.stream.on('data', (message) => {
      for (const frame of message.batch.length ? message.batch : [message]) {
        const waiter = this.pending.get(frame.id);
        if (waiter === undefined || frame.body !== 'answer') continue; // given up already
        this.pending.delete(frame.id);
        clearTimeout(waiter.timer);
        this.answers += 1;
        const { answer } = frame;
        if (answer.code !== grpc.status.OK) {
          waiter.reject(errorOfAnswer(answer));
          continue;
        }
        try {
          waiter.resolve(this.method.responseDeserialize(answer.response));
        } catch (e) {
          waiter.reject(serviceError(grpc.status.INTERNAL, `the answer is not an InvokeResponse: ${e.message}`));
        }
      }
    });
    // A stream that fails fails its open calls with its status (UNAVAILABLE when the sidecar went away);
    // one that ends cleanly fails them UNAVAILABLE: the attempt loop may send them again on a new link.
    this.stream.on('error', (err) => {
      const failure = serviceError(err.code, err.details || err.message, err.metadata);
      // The whole stream refused UNIMPLEMENTED (answers come in frames): this sidecar serves no Mesh.Link.
      failure.linkUnsupported = err.code === grpc.status.UNIMPLEMENTED;
      this.fail(failure);
    });
    this.stream.on('end', () => this.fail(serviceError(grpc.status.UNAVAILABLE, 'the link was closed')));
  }

  fail(err) {
    this.broken = true;
    for (const waiter of this.pending.values()) {
      clearTimeout(waiter.timer);
      waiter.reject(err);
    }
    this.pending.clear();
  }

  /**
   * One call: request an InvokeRequest object, headers {key: value} (what Mesh.Call's metadata would carry),
   * deadline a Date.now() time. Resolves to the InvokeResponse or rejects with the answer's status as an error.
   */
  call(request, headers, deadline) {
    if (this.broken) return Promise.reject(serviceError(grpc.status.UNAVAILABLE, 'the link was closed'));
    const id = String(this.nextId);
    this.nextId += 1;
    const left = deadline - Date.now();
    if (left <= 0) return Promise.reject(serviceError(grpc.status.DEADLINE_EXCEEDED, 'Deadline Exceeded'));
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        // Our deadline passed: give the call up (the sidecar stops it, no answer follows) and fail it here.
        this.pending.delete(id);
        if (!this.broken) this.stream.write({ id, cancel: true });
        reject(serviceError(grpc.status.DEADLINE_EXCEEDED, 'Deadline Exceeded'));
      }, left);
      this.pending.set(id, { resolve, reject, timer });
      this.stream.write({
        id,
        call: {
          request: this.method.requestSerialize(request),
          metadata: Object.entries(headers).map(([key, value]) => ({ key, value })),
          timeout_s: left / 1000,
        },
      });
    });
  }

  /** Half-close: the sidecar answers what is open, then ends the stream. */
  end() {
    if (!this.broken) this.stream.end();
  }
}

/**
 * A caller's links to its sidecar: one open at a time, a new one after it broke; and none once the sidecar
 * refused Mesh.Link itself (UNIMPLEMENTED, `unsupported`: nothing ran, send the calls as unary Mesh.Calls).
 */
class MeshLinks {
  constructor(mesh, callMethod) {
    this.open = () => new MeshLink(mesh, callMethod);
    this.links = [];
    this.unsupported = false;
  }

  call(request, headers, deadline) {
    let link = this.links[this.links.length - 1];
    if (link === undefined || link.broken) this.links.push(link = this.open());
    return link.call(request, headers, deadline).catch((err) => {
      if (err.linkUnsupported) this.unsupported = true;
      throw err;
    });
  }

  /** The links opened and the answer frames they brought back. */
  stats() {
    return { opened: this.links.length, answers: this.links.reduce((n, link) => n + link.answers, 0) };
  }

  /** Half-close the open link: the sidecar ends it once nothing is open. */
  end() {
    this.links[this.links.length - 1]?.end();
  }
}

module.exports = { MeshLink, MeshLinks };
