// hivemesh's error model on the wire: a gRPC status code and message, plus a google.rpc.Status in the
// `grpc-status-details-bin` trailer carrying ErrorInfo (reason, domain "hivemesh"), BadRequest (field
// violations) and RetryInfo (when to try again); a rate limit also sets `grpc-retry-pushback-ms`.
'use strict';

const { grpc, loadRpcTypes } = require('./contracts');

const DETAILS_KEY = 'grpc-status-details-bin';
const PUSHBACK_KEY = 'grpc-retry-pushback-ms';
const DOMAIN = 'hivemesh';
const TYPE_PREFIX = 'type.googleapis.com/';

const rpc = loadRpcTypes();

function pack(type, fields) {
  return { type_url: TYPE_PREFIX + type.fullName.replace(/^\./, ''), value: type.encode(type.create(fields)).finish() };
}

/**
 * A grpc-js error object (for a unary callback or `call.destroy`) with the rich status: ErrorInfo(reason) and,
 * given violations ({field: description}), BadRequest.
 */
function richError(code, message, reason, violations = {}) {
  const details = [pack(rpc.ErrorInfo, { reason, domain: DOMAIN, metadata: {} })];
  const fieldViolations = Object.entries(violations).map(([field, description]) => ({ field, description }));
  if (fieldViolations.length) details.push(pack(rpc.BadRequest, { field_violations: fieldViolations }));
  const status = rpc.Status.encode(rpc.Status.create({ code, message, details })).finish();
  const metadata = new grpc.Metadata();
  metadata.set(DETAILS_KEY, Buffer.from(status));
  return { code, details: message, metadata };
}

function durationMs(d) {
  if (!d) return null;
  return Number(d.seconds || 0) * 1000 + Math.round(Number(d.nanos || 0) / 1e6);
}

/**
 * What a failed call says, decoded: {code, message, reason, domain, metadata, violations, retry_delay_ms,
 * pushback_ms}. Works on any grpc-js ServiceError; the reason is empty when the server sent no ErrorInfo.
 */
function readError(err) {
  const out = {
    code: grpc.status[err.code] || String(err.code),
    message: err.details || err.message,
    reason: '',
    domain: '',
    metadata: {},
    violations: [],
    retry_delay_ms: null,
    pushback_ms: null,
  };
  const md = err.metadata;
  if (!md) return out;
  const [raw] = md.get(DETAILS_KEY);
  if (raw) {
    const status = rpc.Status.decode(raw);
    for (const any of status.details) {
      const type = any.type_url.slice(any.type_url.lastIndexOf('/') + 1);
      if (type === 'google.rpc.ErrorInfo') {
        const info = rpc.ErrorInfo.decode(any.value);
        Object.assign(out, { reason: info.reason, domain: info.domain, metadata: { ...info.metadata } });
      } else if (type === 'google.rpc.BadRequest') {
        out.violations = rpc.BadRequest.decode(any.value).field_violations.map(
          (v) => ({ field: v.field, description: v.description }));
      } else if (type === 'google.rpc.RetryInfo') {
        out.retry_delay_ms = durationMs(rpc.RetryInfo.decode(any.value).retry_delay);
      }
    }
  }
  const [pushback] = md.get(PUSHBACK_KEY);
  if (pushback !== undefined) {
    // gRFC A6: a non-negative integer is how long to wait; anything else means "do not retry".
    out.pushback_ms = /^\d+$/.test(String(pushback)) ? Number(pushback) : -1;
  }
  return out;
}

module.exports = { richError, readError, DOMAIN };
