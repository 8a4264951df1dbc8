// The hivemesh contracts (../../protos, read at run time: nothing is generated or copied) and the google.rpc
// error details (vendored under ./protos/google/rpc, the three small files of googleapis' common protos).
'use strict';

const path = require('node:path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');
const protobuf = require('protobufjs');

const HIVEMESH_PROTOS = path.resolve(__dirname, '..', '..', '..', 'protos');
const VENDORED_PROTOS = path.resolve(__dirname, '..', 'protos');

/** The hivemesh.v1 package as grpc-js service constructors (Agent, Mesh) and message shapes. */
function loadHivemesh() {
  const definition = protoLoader.loadSync(['hivemesh/v1/agent.proto', 'hivemesh/v1/mesh.proto'], {
    keepCase: true, // field names as in the .proto (input_schema, idempotency_key)
    longs: String,
    enums: String,
    bytes: Buffer,
    defaults: true,
    oneofs: true,
    includeDirs: [HIVEMESH_PROTOS],
  });
  return grpc.loadPackageDefinition(definition).hivemesh.v1;
}

/** google.rpc.Status and its details, for reading and writing `grpc-status-details-bin`. */
function loadRpcTypes() {
  const root = new protobuf.Root();
  root.resolvePath = (_origin, target) => path.join(VENDORED_PROTOS, target);
  // google/protobuf/any.proto and duration.proto come bundled with protobufjs.
  root.loadSync(['google/rpc/status.proto', 'google/rpc/error_details.proto'], { keepCase: true });
  return {
    Status: root.lookupType('google.rpc.Status'),
    ErrorInfo: root.lookupType('google.rpc.ErrorInfo'),
    BadRequest: root.lookupType('google.rpc.BadRequest'),
    RetryInfo: root.lookupType('google.rpc.RetryInfo'),
  };
}

module.exports = { grpc, loadHivemesh, loadRpcTypes, HIVEMESH_PROTOS };
