// proto/peersan.proto, loaded once at run time for AdminService and PeerService.

import { join } from 'node:path';
import * as grpc from '@grpc/grpc-js';
import * as protoLoader from '@grpc/proto-loader';

const protoPath = join(__dirname, '..', '..', 'proto', 'peersan.proto');
let loaded: grpc.GrpcObject | undefined;

export function proto(): grpc.GrpcObject {
  if (!loaded) {
    const def = protoLoader.loadSync(protoPath, { keepCase: false, longs: Number, defaults: true, enums: String });
    loaded = grpc.loadPackageDefinition(def).peersan as grpc.GrpcObject;
  }
  return loaded;
}
