#!/usr/bin/env node
// How fast can grpc-js alone carry forwarded reads between two processes? The floor under
// peersan's forwarded I/O, with no iSCSI, no store and no routing:
//
//   node bench/grpc-wall.js [--reply-kib 128] [--depth 16] [--seconds 5] [--batch 1]
//
// A server process answers each small request (44 bytes, like a read frame) with a fresh
// buffer of --reply-kib (as a store read would be), on one bidirectional stream with raw
// serializers and the channel options peers used for it (issue 19 moved block frames off gRPC
// to a data stream of their own, src/routing/data-stream.ts: this measures what that left). The client keeps --depth
// requests outstanding, sending up to --batch requests per message. Prints replies/s, MB/s and
// the CPU time (all threads, from /proc) each process spent per reply: what gRPC costs before
// peersan does any work of its own.
'use strict';

const { fork } = require('node:child_process');
const fs = require('node:fs');
const grpc = require('@grpc/grpc-js');
const { peerChannelOptions: rpcOptions } = require('../dist/cluster/peer-rpc');

const raw = (b) => b;
/** The block stream service peers had before issue 19. */
const peerDataService = {
  blocks: { path: '/peersan.PeerData/Blocks', requestStream: true, responseStream: true, requestSerialize: raw, requestDeserialize: raw, responseSerialize: raw, responseDeserialize: raw, originalName: 'Blocks' },
};
// HTTP/2's default 64 KiB flow-control window throttles 128 KiB reads to a crawl.
const peerChannelOptions = { ...rpcOptions, 'grpc-node.flow_control_window': 16 * 1024 * 1024 };

const args = { replyKib: 128, depth: 16, seconds: 5, batch: 1 };
const flags = { '--reply-kib': 'replyKib', '--depth': 'depth', '--seconds': 'seconds', '--batch': 'batch' };
for (let i = 2; i < process.argv.length; i += 2) {
  const k = flags[process.argv[i]];
  if (k) args[k] = Number(process.argv[i + 1]);
}

const cpuMs = (pid) => {
  const f = fs.readFileSync(`/proc/${pid}/stat`, 'utf8').split(') ')[1].split(' ');
  return (Number(f[11]) + Number(f[12])) * 10;
};

if (process.argv.includes('--server')) {
  const replyBytes = args.replyKib * 1024;
  const server = new grpc.Server(peerChannelOptions);
  server.addService(peerDataService, {
    blocks(call) {
      call.on('data', (batch) => {
        // One reply per request in the batch; each a fresh buffer (a store read allocates one).
        for (let at = 0; at < batch.length; at += 44) call.write(Buffer.allocUnsafe(replyBytes));
      });
      call.on('end', () => call.end());
    },
  });
  server.bindAsync('127.0.0.1:0', grpc.ServerCredentials.createInsecure(), (err, port) => {
    if (err) throw err;
    process.send({ port });
  });
} else {
  const child = fork(__filename, [...process.argv.slice(2), '--server']);
  child.on('message', ({ port }) => {
    process.on('exit', () => child.kill());
    const Client = grpc.makeGenericClientConstructor(peerDataService, 'PeerData');
    const client = new Client(`127.0.0.1:${port}`, grpc.credentials.createInsecure(), peerChannelOptions);
    const stream = client.blocks(new grpc.Metadata());
    let outstanding = 0;
    let replies = 0;
    let measuring = false;
    let start = 0;
    const cpu0 = {};
    const fill = () => {
      let n = 0;
      while (outstanding + n < args.depth) n++;
      for (let sent = 0; sent < n; sent += args.batch) {
        const k = Math.min(args.batch, n - sent);
        stream.write(Buffer.alloc(44 * k));
        outstanding += k;
      }
    };
    stream.on('data', (reply) => {
      outstanding--;
      if (measuring) replies++;
      if (reply.length !== args.replyKib * 1024) throw new Error('short reply');
      if (outstanding <= args.depth / 2) setImmediate(fill);
    });
    fill();
    setTimeout(() => {
      measuring = true;
      start = performance.now();
      cpu0.client = cpuMs(process.pid);
      cpu0.server = cpuMs(child.pid);
    }, 1000);
    setTimeout(() => {
      const secs = (performance.now() - start) / 1000;
      const perReplyUs = (ms) => ((ms * 1000) / replies).toFixed(1);
      const clientMs = cpuMs(process.pid) - cpu0.client;
      const serverMs = cpuMs(child.pid) - cpu0.server;
      console.log(JSON.stringify({
        ...args,
        repliesPerSec: Math.round(replies / secs),
        mbPerSec: Math.round((replies * args.replyKib * 1024) / secs / 1e6),
        cpuUsPerReply: { client: Number(perReplyUs(clientMs)), server: Number(perReplyUs(serverMs)) },
      }));
      stream.cancel();
      client.close();
      child.kill();
      process.exit(0);
    }, (1 + args.seconds) * 1000);
  });
}
