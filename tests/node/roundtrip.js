#!/usr/bin/env node
// A Node.js peer of the credstream.v1 API, written from the proto alone:
// @grpc/proto-loader loads proto/ at run time (no generated code). It
// subscribes as an agent, publishes an AWS credential as a publisher, and
// checks that the agent receives exactly that credential. It prints one JSON
// object with what it saw; tests/tests/api_product.rs asserts on it.
//
// Usage (node_modules with @grpc/grpc-js and @grpc/proto-loader on NODE_PATH
// or above this file):
//   CREDSTREAM_TARGET=127.0.0.1:50051 CREDSTREAM_CLUSTER=dev \
//   CREDSTREAM_PUBLISHER_TOKEN=... CREDSTREAM_AGENT_TOKEN=... \
//     node tests/node/roundtrip.js
// Every wait is bounded by CREDSTREAM_TIMEOUT_MS (default 20000); nothing
// sleeps to synchronise.
'use strict';

const path = require('node:path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

const target = process.env.CREDSTREAM_TARGET || '127.0.0.1:50051';
const cluster = process.env.CREDSTREAM_CLUSTER || 'node-roundtrip';
const publisherToken = required('CREDSTREAM_PUBLISHER_TOKEN');
const agentToken = required('CREDSTREAM_AGENT_TOKEN');
const timeoutMs = Number(process.env.CREDSTREAM_TIMEOUT_MS || 20000);
const protoDir = process.env.CREDSTREAM_PROTO_DIR || path.join(__dirname, '..', '..', 'proto');

const ACCESS_KEY_ID = 'ASIANODEROUNDTRIP001';
const SECRET_ACCESS_KEY = 'node-secret-access-key';
const SESSION_TOKEN = 'node-session-token';

function required(name) {
  const value = process.env[name];
  if (!value) {
    console.error(`set ${name}`);
    process.exit(2);
  }
  return value;
}

// proto-loader resolves `google/protobuf/timestamp.proto` from the copies it
// ships; includeDirs finds our own files.
const definition = protoLoader.loadSync('credstream/v1/credstream.proto', {
  includeDirs: [protoDir],
  keepCase: true,
  longs: String,
  enums: String,
  defaults: true,
  oneofs: true,
});
const v1 = grpc.loadPackageDefinition(definition).credstream.v1;

function metadata(token) {
  const md = new grpc.Metadata();
  md.set('authorization', `Bearer ${token}`);
  md.set('x-credstream-cluster', cluster);
  return md;
}

// Reads a stream's messages into a queue; next(pred, what) resolves with the
// first message matching pred, or rejects on timeout, error or end.
function reader(call, name) {
  const queue = [];
  let waiter = null;
  let ended = null;
  const wake = () => {
    if (waiter) waiter();
  };
  call.on('data', (message) => {
    queue.push(message);
    wake();
  });
  call.on('error', (error) => {
    ended = `${name} failed: ${grpc.status[error.code]} ${error.details}`;
    wake();
  });
  call.on('end', () => {
    ended = ended || `${name} ended`;
    wake();
  });
  return function next(pred, what) {
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        waiter = null;
        reject(new Error(`no ${what} on ${name} within ${timeoutMs} ms`));
      }, timeoutMs);
      const check = () => {
        while (queue.length > 0) {
          const message = queue.shift();
          if (pred(message)) {
            clearTimeout(timer);
            waiter = null;
            resolve(message);
            return;
          }
        }
        if (ended) {
          clearTimeout(timer);
          waiter = null;
          reject(new Error(`${ended} while waiting for ${what}`));
        }
      };
      waiter = check;
      check();
    });
  };
}

function timestamp(offsetSeconds) {
  return { seconds: String(Math.floor(Date.now() / 1000) + offsetSeconds), nanos: 0 };
}

async function main() {
  const result = { cluster };
  const agents = new v1.AgentService(target, grpc.credentials.createInsecure());
  const publishers = new v1.PublisherService(target, grpc.credentials.createInsecure());
  const calls = [];
  try {
    // The agent first: its snapshot is whatever the broker holds now.
    const subscribe = agents.Subscribe(metadata(agentToken));
    calls.push(subscribe);
    const agentNext = reader(subscribe, 'Subscribe');
    subscribe.write({ hello: { cluster_id: cluster, agent_id: 'node-agent-1' } });
    const first = await agentNext(() => true, 'snapshot');
    if (first.message !== 'snapshot') throw new Error(`first Subscribe message is ${first.message}`);
    result.snapshot_version = Number(first.snapshot.version);

    const publish = publishers.Publish(metadata(publisherToken));
    calls.push(publish);
    const publisherNext = reader(publish, 'Publish');
    publish.write({
      hello: {
        cluster_id: cluster,
        kinds: ['CREDENTIAL_KIND_AWS'],
        private_env: false,
        publisher_name: 'node-roundtrip',
      },
    });
    const welcome = await publisherNext(() => true, 'welcome');
    if (welcome.message !== 'welcome') throw new Error(`first Publish message is ${welcome.message}`);
    result.welcome_missing = welcome.welcome.missing;

    const expiresAt = timestamp(3600);
    publish.write({
      credential: {
        aws: {
          access_key_id: ACCESS_KEY_ID,
          secret_access_key: SECRET_ACCESS_KEY,
          session_token: SESSION_TOKEN,
          region: 'eu-west-1',
        },
        issued_at: timestamp(0),
        expires_at: expiresAt,
      },
    });
    // The first ack whose version is past the welcome's is the one for our change.
    const ack = await publisherNext(
      (m) => m.message === 'update_ack' && Number(m.update_ack.version) > Number(welcome.welcome.version),
      'update_ack',
    );
    result.ack_version = Number(ack.update_ack.version);

    const update = await agentNext(
      (m) => m.message === 'credential' && m.credential.credential === 'aws',
      'the published credential',
    );
    const credential = update.credential;
    result.received = {
      version: Number(credential.version),
      access_key_id: credential.aws.access_key_id,
      secret_intact:
        credential.aws.secret_access_key === SECRET_ACCESS_KEY && credential.aws.session_token === SESSION_TOKEN,
      expires_at_seconds: credential.expires_at.seconds,
      expires_at_matches: credential.expires_at.seconds === expiresAt.seconds,
    };
    result.ok = true;
  } catch (error) {
    result.ok = false;
    result.error = error.message;
  } finally {
    for (const call of calls) call.cancel();
    agents.close();
    publishers.close();
  }
  console.log(JSON.stringify(result, null, 2));
  process.exit(result.ok ? 0 : 1);
}

main();
