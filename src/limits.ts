// Every limit peersan enforces lives here, with the relations between them asserted once
// at load. A length read from the wire or from a peer is checked against one of these (or a
// negotiated value bounded by one of these) BEFORE anything is allocated for it.

/** Logical blocks per page: the unit of routing and migration (DESIGN.md 2). */
export const pageBlocks = 8192;

/** Copy-on-write / provisioning grain of the page store, in bytes. */
export const grainBytes = 64 * 1024;

/** Block sizes a volume may have. */
export const blockBytesAllowed: readonly number[] = [512, 4096];

// ---- iSCSI -----------------------------------------------------------------------------

/** Basic Header Segment length (RFC 7143 11.2). */
export const bhsBytes = 48;
/** TotalAHSLength is one byte of 4-byte words. */
export const ahsBytesMax = 255 * 4;
/** The most data segment bytes we ever accept in one PDU, whatever is negotiated (2^24-1 is the RFC's). */
export const dataSegmentBytesMax = 1024 * 1024;
/** What we declare as our MaxRecvDataSegmentLength unless configured otherwise. */
export const maxRecvDataSegmentBytesDefault = 256 * 1024;
/** The smallest MaxRecvDataSegmentLength the RFC allows. */
export const maxRecvDataSegmentBytesMin = 512;
/** Login/Text key=value payload of one request sequence (continued PDUs are concatenated). */
export const textPayloadBytesMax = 64 * 1024;
/** SendTargets answers longer than this are split with the C bit / continued over Text PDUs. */
export const maxBurstBytesMax = 16 * 1024 * 1024 - 1;
export const maxBurstBytesDefault = 1024 * 1024;
export const firstBurstBytesDefault = 256 * 1024;
export const maxOutstandingR2tMax = 16;
/** CmdSN window we offer: MaxCmdSN = ExpCmdSN + this - 1 (commands queued per session). */
export const cmdWindowPerSession = 128;
/** One SCSI command may move at most this many bytes (also reported in the Block Limits VPD). */
export const transferBytesMax = 8 * 1024 * 1024;
/** Sessions per peer, connections per session. */
export const sessionsPerPeerMax = 256;
export const connectionsPerSessionMax = 1;
/** Connections that may sit in the login phase at once, and how long a login may take. */
export const loginConnectionsMax = 64;
export const loginMsMax = 10_000;
/** Target-initiated NOP-In ping: sent after this idle time; connection dropped if no answer in the timeout. */
export const nopIdleMs = 5_000;
export const nopTimeoutMs = 15_000;
/** Bytes queued for sending on one connection before we stop reading from it (back-pressure). */
export const socketQueuedBytesMax = 32 * 1024 * 1024;
// Login admission (issue 15 item 4): a hostile host must not keep good ones from logging in.
// Hosts behind one address (NAT, or every loopback test) share the per-source bounds, so the
// main defence is time: a login connection silent for loginPduGapMsMax is dropped, and one with
// no complete PDU for loginStallEvictMs gives its place to a new connection when the table is full.
/** Login-phase connections from one source address. */
export const loginConnectionsPerSourceMax = 16;
/** Connections in any phase from one source address (far above what one host or a test opens). */
export const connectionsPerSourceMax = 128;
/** The longest a login connection may go without a complete PDU (the first counted from accept). */
export const loginPduGapMsMax = 5_000;
/** A login connection with no complete PDU for this long may be evicted for a new connection. */
export const loginStallEvictMs = 1_000;
/** Discovery sessions per portal: their own budget, apart from the Normal sessions' sessionsPerPeerMax. */
export const discoverySessionsMax = 32;
/** A Discovery session with no request (NOP-Outs do not count) for this long is dropped. */
export const discoveryIdleMsMax = 30_000;

// -- What sessions hold for hosts (issue 15 item 2; slice A) --
/**
 * Bytes one session's admitted commands may hold: a write's data-out buffer until the command
 * ends, a read's data until its Data-In has left for the socket. A command that does not fit
 * waits (it holds nothing meanwhile): a host that does not read its answers stops its own commands.
 */
export const sessionTaskBytesMax = 32 * 1024 * 1024;
/** Bytes every session may hold without asking the peer's shared budget: small commands never wait for other hosts. */
export const sessionGuaranteedBytes = 1024 * 1024;
/** What sessions hold beyond their guaranteed bytes, all together (one ByteBudget per portal). */
export const peerTaskBytesMax = 64 * 1024 * 1024;
/** Data (immediate, unsolicited) a session may hold for commands waiting for bytes; a command beyond it is answered BUSY. */
export const sessionParkedBytesMax = 256 * 1024;
/**
 * Answers other than read data (NOP-In echoes, responses, R2Ts, text) a session may have
 * waiting for its socket: one largest NOP-In echo and a window of small ones. Beyond it the
 * host is not reading and the connection is closed.
 */
export const sessionAnswerBytesMax = maxRecvDataSegmentBytesDefault + 256 * 1024;
/** A session whose answers have not moved to its socket for this long is closed: it holds bytes other hosts need. */
export const answerStallMsMax = 30_000;

// ---- SCSI ------------------------------------------------------------------------------

export const cdbBytesMax = 260; // 16 in the BHS + extended CDB AHS
/** UNMAP: descriptors per command and blocks per descriptor we advertise. */
export const unmapDescriptorsMax = 256;
export const unmapBlocksMax = 1024 * 1024;
/** WRITE SAME: blocks per command (initiators assume they may WRITE as many blocks as they WRITE SAME). */
export const writeSameBlocksMax = 65535;
/** COMPARE AND WRITE: blocks per command (the Block Limits VPD field is one byte). */
export const compareAndWriteBlocksMax = 255;
/** Persistent reservation registrations per logical unit. */
export const prRegistrationsMax = 256;

// ---- Snapshot layers (page store) -----------------------------------------------------------

/** Snapshots one volume may have on a peer: every read of an old snapshot walks the newer ones. */
export const snapshotsPerVolumeMax = 256;
/** New slots the store keeps inside its data file ahead of use (sparse; see StoreVolume.reserveAhead). */
export const storeReserveAheadSlots = 4096;
/** A snapshot id as the store records it. */
export const snapshotIdBytesMax = 128;

// ---- Admin / cluster -------------------------------------------------------------------

export const volumeNameBytesMax = 64;
export const volumeBytesMax = 64 * 1024 ** 4; // 64 TiB
export const gracefulStopMs = 10_000;
/** A graceful leave hands its primary roles to in-sync copies for at most this long, then stops anyway (DESIGN.md 11). */
export const leaveHandoverMs = 10_000;
/** Role switches a leaving peer has in flight at once (each one CAS after its page's writes are quiet). */
export const leaveSwitchesInFlightMax = 16;
/** How often `peersan peer drain --wait` looks at the drain's progress. */
export const drainPollMs = 1_000;
// Admin input (issue 15 item 9, slice E): numbers are checked where they enter the admin path
// (CLI, AdminClient, the console's JSON API), before a wire field can truncate them.
/** The largest value a uint32 field of proto/peersan.proto carries; larger ones are refused, never truncated. */
export const wireUint32Max = 0xffff_ffff;

function assert(cond: boolean, what: string): void {
  if (!cond) throw new Error(`limits: ${what}`);
}
assert(grainBytes % 4096 === 0, 'grain is a whole number of the largest block');
assert((pageBlocks * 512) % grainBytes === 0, 'a page is a whole number of grains');
assert(maxRecvDataSegmentBytesDefault <= dataSegmentBytesMax, 'MRDSL within data segment max');
assert(firstBurstBytesDefault <= maxBurstBytesDefault, 'FirstBurst <= MaxBurst');
assert(transferBytesMax <= sessionTaskBytesMax, 'one command of any size runs once its session holds nothing');
assert(transferBytesMax <= peerTaskBytesMax, 'one command of any size runs once the shared budget is free');
assert(sessionGuaranteedBytes <= sessionTaskBytesMax, 'guaranteed bytes are within the session bound');
assert(sessionParkedBytesMax >= firstBurstBytesDefault, 'one command\'s unsolicited data can wait');
assert(sessionAnswerBytesMax >= maxRecvDataSegmentBytesDefault + cmdWindowPerSession * 2 * bhsBytes, 'a NOP-In echo (default MaxRecvDataSegmentLength) and a window of responses can wait');
// What hosts make a peer hold at most, however many sessions: the shared budget plus what each
// Normal session may hold on its own (512 MiB), plus the answers queued for Discovery sessions.
assert(peerTaskBytesMax + sessionsPerPeerMax * (sessionGuaranteedBytes + sessionParkedBytesMax + sessionAnswerBytesMax) <= 512 * 1024 * 1024, 'Normal sessions cost at most 512 MiB');
assert(discoverySessionsMax * sessionAnswerBytesMax <= 16 * 1024 * 1024, 'Discovery sessions cost at most 16 MiB more');
assert(answerStallMsMax > nopTimeoutMs, 'a slow reader is not taken for a stalled one before a NOP would be');
assert(cmdWindowPerSession >= 1, 'window');
assert(compareAndWriteBlocksMax <= 255, 'MAXIMUM COMPARE AND WRITE LENGTH is one byte');
assert(volumeBytesMax / (pageBlocks * 512) <= wireUint32Max, 'every page number of the largest volume fits a uint32 field');
assert(loginConnectionsPerSourceMax <= loginConnectionsMax, 'one source cannot take the whole login table');
assert(connectionsPerSourceMax >= loginConnectionsPerSourceMax, 'a source may log in as many as it may hold');
assert(loginStallEvictMs < loginPduGapMsMax && loginPduGapMsMax < loginMsMax, 'a stalled login is evictable before it is dropped, and dropped before the whole login times out');

// ---- Peer group ------------------------------------------------------------------------

/** One forwarded block frame (header + data): a whole command's data fits. */
export const peerFrameBytesMax = transferBytesMax + 64 * 1024;
/** One gRPC message of batched frames (a whole frame always fits alone). */
export const peerBatchBytesMax = peerFrameBytesMax + 4096;
/**
 * Received read replies kept for reuse once their host read has sent them (src/routing/read-buffers.ts):
 * what 128 hosts' 128 KiB reads in flight use, so a forwarding peer's steady stream of large
 * reads allocates nothing; what is given back beyond it is left to the GC.
 */
export const readBuffersFreeBytesMax = 16 * 1024 * 1024;
/** Forwarded requests outstanding per peer link; more wait for a slot (back-pressure). */
export const peerRequestsInFlightMax = 256;
/** A forwarded request that gets no answer in this time fails (the host sees a SCSI error, never a hang). */
export const peerRequestMsMax = 5_000;
/** How long a request waits for the connection to its owner to come up (reconnect backoff is at most 1 s). */
export const peerConnectMsMax = 2_000;
/** How long a peer waits for another's answer to a status-like call (status, moves list, plans). */
export const statusPeerMsMax = 1_500;
/** Page-move control calls between peers (prepare clears a page on the destination). */
export const moveRpcMsMax = 10_000;
/** How long a forwarded request waits for an owner that has not opened a just-created volume yet. */
export const volumeOpenWaitMsMax = 1_000;
/** MOVED answers followed per request before giving up (routes settle in one or two). */
export const routeRetriesMax = 8;
/** Peers that must acknowledge a reservation change wait at most this long each. */
export const reservationNotifyMsMax = 2_000;
assert(peerFrameBytesMax > transferBytesMax, 'a whole command fits one frame');
assert(peerConnectMsMax < peerRequestMsMax, 'a request fails within its bound even when it first waits to connect');
// -- replicated writes (issue 17, src/replication/replicated.ts) --
/**
 * How long a page's primary waits for an in-sync copy to acknowledge a change; a copy that has
 * not by then is dropped from the in-sync set (catalog CAS) and the change acknowledged without it.
 * A dead copy's whole cost to the hosts: at 1.5 s every kill of a peer holding only copies paused
 * them past the 1.5 s median the failover soak aims at (bench/failover-soak.js: 1.50-1.57 s).
 */
export const replicaAckMsMax = 1_000;

/**
 * How long a primary that lost a page in the middle of a change (another peer took it over)
 * names the copies that may differ from the new primary on that change, until the new primary
 * reconciles them, to the snapshots freezing and sealing here (replicated.ts divergedCopies). A
 * timestamp snapshot's TAKE(T) waiting for the change answers as soon as it settles; this is
 * well past the longest such wait (snapshot/coordinator.ts sealMsMax, asserted there).
 */
export const divergedKeepMs = 15_000;
/**
 * The wait for a copy on a peer that is leaving the group (a graceful stop) or that nothing came
 * from for a lease and its margin: it answers in milliseconds while it still runs, and not at
 * all once stopped or hung, when its hosts' writes should not wait replicaAckMsMax for it (a
 * rolling restart's pause; a write held by a snapshot's barrier, then by a hung copy, past the
 * forwarding peer's deadline). Past this it is dropped from the in-sync set and resyncs later.
 */
export const goneAckMsMax = 150;
assert(2 * replicaAckMsMax < peerRequestMsMax, 'a slow copy is dropped (the wait, then a catalog CAS) before the forwarding peer gives up on the primary');
// -- peer authentication (issue 15 item 5, src/cluster/peer-auth.ts) --
/** How far a peer RPC authentication stamp may be from the receiver's clock (either way). */
export const peerAuthSkewMsMax = 30_000;
/**
 * Nonces of accepted peer calls remembered to refuse replays (each for 2 × the skew): about
 * 1,000 calls a second from the whole group, far above its control traffic (the block data
 * stream is one call per peer pair). Full: new calls are refused, never a replay accepted.
 */
export const peerAuthNoncesMax = 65_536;
/** Lifetimes of the certificates `peersan init` / `peersan demo` make (src/cluster/pki.ts). */
export const tlsCaDays = 3650;
export const tlsPeerCertDays = 825;
// -- the block data stream's handshake (issue 19, src/routing/data-stream.ts): every port is probed
/** From accept to an authenticated hello (preamble, STARTTLS, hello): a socket still short of it then is closed. */
export const peerHandshakeMsMax = 3_000;
/** Sockets on the rpc port not yet known as gRPC or an authenticated data stream; more are closed at once. */
export const peerHandshakesMax = 256;
/** Bytes of a data stream's hello frame (peer id ≤ 255, stamp, nonce, MAC, separators). */
export const peerHelloBytesMax = 512;
/**
 * Reply bytes an owner has written to a data stream that its sender has not taken yet; past it
 * the owner stops reading requests until they are. Node's own mark (16 KiB) is less than one
 * 128 KiB read: pausing at it made the stream carry one read at a time.
 */
export const peerStreamRepliesQueuedBytesMax = 32 * 1024 * 1024;
/** TCP keepalive of a data stream: a peer gone without a FIN is noticed. */
export const peerKeepAliveMs = 10_000;
assert(peerStreamRepliesQueuedBytesMax >= 2 * peerFrameBytesMax, 'the largest reply does not stop a stream alone');
assert(peerConnectMsMax < peerHandshakeMsMax, 'an honest peer gives up connecting before the owner gives up on its handshake');
assert(peerAuthSkewMsMax <= 60_000, 'a captured header is dead within a minute');
assert(tlsPeerCertDays <= tlsCaDays, 'a peer certificate does not outlive its CA by design');
assert(peerAuthNoncesMax * 100 <= 16 * 1024 * 1024, 'the nonce ledger stays within ~16 MB');
// -- slice D (issue 15, item 7): what a forwarded request from another peer may ask for. A reply
// frame is 24 header bytes, the owner's id (at most 255 bytes), then the payload.
/** Bytes one forwarded READ may return: a host command's worth, so its reply always fits one frame. */
export const peerReadBytesMax = transferBytesMax;
/** Pages one GET LBA STATUS covers, and so one forwarded lbaStatus request (the router asks for fewer). */
export const lbaStatusPagesMax = 64;
/** Blocks one forwarded unmap may cover: one UNMAP descriptor's, or one WRITE SAME's. */
export const peerUnmapBlocksMax = Math.max(unmapBlocksMax, writeSameBlocksMax);
/**
 * Bytes one block stream's requests may hold on the owner (write data, data read); a request
 * beyond it is answered BUSY. A window of 256 requests of 8 MiB would otherwise be 2 GiB.
 */
export const peerStreamBytesInFlightMax = 256 * 1024 * 1024;
/** Bytes of a failure's message carried in a reply frame (the kind decides, the text is for the log). */
export const peerFailureTextBytesMax = 512;
/** Volumes (or snapshot layers) named in one peer request (a snapshot of a consistency group). */
export const peerRequestVolumesMax = 1_024;
/** Unit attentions in one reservation notice (one per registration at most, and one for every nexus). */
export const peerUnitAttentionsMax = prRegistrationsMax + 1;
/** Bytes of one replication message's JSON body (src/replication/messages.ts). */
/**
 * Silence after which a peer's target port group is reported unavailable (ALUA, src/server/
 * port-groups.ts): well past gossip's staleness, so a late gossip raises no unit attention.
 */
export const aluaUnavailableMs = 10_000;
export const peerReplicationBodyBytesMax = 1024 * 1024;
/** How long a host move plan may ask to be kept. */
export const hostMovePlanMsMax = 10 * 60_000;
assert(peerStreamBytesInFlightMax >= 8 * peerFrameBytesMax, 'a stream runs several of the largest requests at once');
assert(24 + 255 + peerReadBytesMax <= peerFrameBytesMax, 'the largest read reply fits one frame');
assert(24 + 255 + lbaStatusPagesMax * pageBlocks * 13 <= peerFrameBytesMax, 'an lbaStatus reply (one extent per block at worst) fits one frame');

// ---- Replicas: leases and failover (src/replication, DESIGN.md 10) ---------------------
// Assumption the safety of reads rests on: monotonic clocks of two peers drift apart by less
// than 1 % and no event loop stalls for longer than the margin. A primary holds a lease from
// each in-sync copy until (its time of sending the renewal) + leaseMs; a copy promotes itself
// only once it has granted nothing for leaseMs + leaseDriftMarginMs (its own time). Its last
// grant came after the primary sent the renewal, so the primary's lease ran out first.
/** Every peer renews its leases with every other peer this often. */
export const leasePingMs = 250;
/** A renewal is good for this long, counted from when the primary sent it. */
export const leaseMs = 1_000;
/** What a copy waits beyond leaseMs before it takes over (clock drift and event-loop stalls). */
export const leaseDriftMarginMs = 300;
/** A renewal not answered in this time is given up (its lease would be worth little by then). */
export const leaseCallMsMax = 500;
/** A host request for a page whose primary is unreachable waits this long for a new primary. */
export const failoverWaitMsMax = 8_000;
/** A flush waiting for new primaries (Router.flush) looks at the table at least this often. */
export const flushTakeoverRecheckMs = 250;
/** The new primary's `recent` question to each in-sync copy (an unanswered copy is dropped from the in-sync set). */
export const recentCallMsMax = 1_500;
/** A primary tries again to drop copies that may lack a failed change (the catalog was out of reach) after this, twice as long each time, up to the max. */
export const dropRetryMsMin = 250;
export const dropRetryMsMax = 8_000;
/**
 * A restarted primary handing a suspect page over waits this long for the secondary's answer (its
 * CAS): unanswered, it reads the route (the CAS may have happened) and asks again. Short, so that
 * an ask lost in a partition does not keep the suspect copy in the in-sync set for long.
 */
export const handoverCallMsMax = 2 * recentCallMsMax;
/** Route changes (takeovers) one lease answer carries; more come with the next renewals, the lease waits for them. */
export const leaseTakeoversPerAnswerMax = 2_048;
/** A peer that stays silent is looked at again (pages to take over) after leasePingMs, twice as long each time, up to this. */
export const silenceRefireMsMax = 8_000;
/** Times a read runs again because a lease ran out during it (and rounds of waiting for leases) before the host hears BUSY. */
export const leaseReadRunsMax = 3;
/** Pages one peer takes over at once when a primary falls silent (the rest queue). */
export const promotionsInFlightMax = 16;
/** Rounds of a new primary's reconcile (a round ends early when the route changed under it) before it gives up. */
export const reconcileRoundsMax = 4;
assert(leaseMs > 2 * leasePingMs, 'one lost renewal does not lose a lease');
// Each peer receives (1000 / leasePingMs) renewals a second from every other peer, each an authenticated call whose nonce it keeps for 2 × the skew.
assert((1000 / leasePingMs) * 63 * (2 * peerAuthSkewMsMax / 1000) <= peerAuthNoncesMax / 4, 'renewals in a group of 64 peers take at most a quarter of the nonce ledger');
assert(leaseCallMsMax < leaseMs - leasePingMs, 'an answered renewal still leaves a lease');
assert(leaseDriftMarginMs >= 0.02 * (leaseMs + leaseDriftMarginMs) + 250, 'the margin covers 1 % drift each way and a 250 ms stall');
assert(leaseMs + leaseDriftMarginMs + recentCallMsMax <= 3_000, 'a takeover (silence, then reconcile) fits the 3 s failover pause aimed at');
assert(failoverWaitMsMax >= leaseMs + leaseDriftMarginMs + 2 * recentCallMsMax + peerConnectMsMax, 'a host request outwaits a takeover');
assert(dropRetryMsMin <= dropRetryMsMax, 'drop backoff');
assert(handoverCallMsMax < failoverWaitMsMax, 'a handover is asked again sooner than a host request waits');
assert(failoverWaitMsMax + peerRequestMsMax < 30_000, 'a failover stays inside an initiator\'s 30 s command timeout');

// ---- EXTENDED COPY (LID1) --------------------------------------------------------------

/** CSCD (target) descriptors and segment descriptors per EXTENDED COPY, and their total bytes. */
export const xcopyCscdDescriptorsMax = 8;
export const xcopySegmentDescriptorsMax = 8;
export const xcopyDescriptorListBytesMax = 512;
/** Bytes one block→block segment may move (NUMBER OF BLOCKS is 16 bits; 65535 × 4096 < 256 MiB). */
export const xcopySegmentBytesMax = 256 * 1024 * 1024;
/** Inline data we accept (and ignore: no segment type that uses it is supported). */
export const xcopyInlineBytesMax = 0;
/** A copy moves data in chunks of at most this many bytes. */
export const xcopyChunkBytes = 1024 * 1024;
/** Copy results held per I_T nexus for RECEIVE COPY RESULTS. */
export const xcopyHeldResultsMax = 16;
assert(16 + xcopyDescriptorListBytesMax <= transferBytesMax, 'an EXTENDED COPY parameter list fits one command');
assert((xcopyCscdDescriptorsMax + 1) * 32 + 28 <= xcopyDescriptorListBytesMax, 'one too many CSCDs is reported as too many, not as too long');
assert(32 + (xcopySegmentDescriptorsMax + 1) * 28 <= xcopyDescriptorListBytesMax, 'one too many segments is reported as too many, not as too long');

// ---- HTTP console and metrics ----------------------------------------------------------

/** Largest JSON body an /api request may carry (a volume with a long allow list fits). */
export const httpBodyBytesMax = 64 * 1024;
/** A whole request (headers and body) must arrive within this time. */
export const httpRequestMsMax = 30_000;
/** Event-stream (/api/events) clients one peer keeps open at once; more get 503. */
export const consoleStreamClientsMax = 16;
/** How often the event stream pushes a fresh state (status, volumes) to its clients. */
export const consoleRefreshMs = 2_000;
/** Recent events each peer keeps for the console (a ring: the oldest go first). */
export const consoleEventsMax = 256;
assert(consoleRefreshMs < httpRequestMsMax, 'a state push is not mistaken for a stuck request');
// ---- Load monitoring and balancing (src/loadmon) ---------------------------------------

/** Meters fold into their averages, and every peer gossips its summary, this often. */
export const loadTickMs = 1_000;
/** A gossip call that takes longer is abandoned (the next tick sends a fresh summary). */
export const loadGossipMsMax = 800;
/** A peer not heard from for this long is shown stale and left out of balancing. */
export const loadStaleMs = 3_000;
assert(aluaUnavailableMs >= 3 * loadStaleMs, 'a port group goes unavailable only well after its gossip is stale');
/** Pages metered per peer (all volumes); beyond it new pages count only in the volume and peer totals. */
export const loadPagesTrackedMax = 16_384;
/** Host sessions metered per peer (live and recently ended). */
export const loadHostsTrackedMax = 1_024;
/** A page or ended session with no I/O for this long is forgotten. */
export const loadEntryIdleMs = 180_000;
/** A summary carries at most this many of a volume's hottest pages … */
export const loadHottestPagesPerVolume = 64;
/** … for at most this many volumes, at most this many host sessions, and recent moves. */
export const loadVolumesPerSummaryMax = 1_024;
export const loadHostsPerSummaryMax = sessionsPerPeerMax;
export const loadRecentMovesMax = 1_024;
/** Pages in one summary over all its volumes (the hottest volumes first), and in one `top` answer. */
export const loadSummaryPagesMax = 8_192;
export const loadTopPagesMax = 4_096;
/**
 * The traffic matrix (pages follow their hosts): pages whose arrivals at this peer's portal are
 * metered (all volumes; beyond it new pages are not), and the hottest pages a summary reports as
 * forwarded from here, per volume and over all volumes. An entry is a page number and one load
 * figure (under 16 bytes encoded).
 */
export const loadArrivalPagesTrackedMax = 16_384;
export const loadForwardedPagesPerVolume = 64;
export const loadSummaryForwardedMax = 8_192;
/** The most page moves one balancing round may start on one peer. */
export const balancerMovesPerRoundMax = 64;
/**
 * After a page move (in flight, or started) this recently, or the group's load rising from below
 * minMeanLoad, peer loads are not trusted to stand out: the balancer's figure is a 10 s average
 * (loadmon/ewma.ts) gossiped a second apart, and a move changes both who serves a page and how
 * fast its host runs (a page that followed its host is served without the hop), so for one
 * window the peers' figures compare different moments of a changing load. Only follow moves then.
 */
export const balancerSettleMs = 10_000;
assert(loadGossipMsMax < loadTickMs, 'a gossip call ends before the next one starts');
assert(loadStaleMs >= 2 * loadTickMs, 'one lost gossip does not make a peer stale');
assert(loadHostsTrackedMax >= sessionsPerPeerMax + discoverySessionsMax, 'every live session can be metered');
// A page entry encodes to under 160 bytes, a host entry to under 400: a summary stays far below one peer message.
assert(loadSummaryPagesMax * 160 + loadSummaryForwardedMax * 16 + loadHostsPerSummaryMax * 400 + loadVolumesPerSummaryMax * 400 < peerBatchBytesMax / 2, 'a summary fits a peer message');
assert(loadTopPagesMax * 200 < 4 * 1024 * 1024 / 2, 'a top answer fits gRPC\'s default 4 MiB receive limit of the CLI');
// -- slice D (issue 15, item 7): moves in one StartMoves request from another peer (a manual
// rebalance sends an owner all of its moves of the plan at once).
export const peerPlannedMovesMax = 4_096;
assert(peerPlannedMovesMax >= balancerMovesPerRoundMax, 'a balancing round fits one request');

// ---- Replication: activity log and resync (src/replication/activity.ts, resync.ts) ----------

/**
 * A page leaves a peer's activity log once it had no change for this long, no recent grains and
 * a flush after its last change: a page changed more recently is suspect after a crash. It also
 * bounds how long a change may take from beforeChange to its apply (see ActivityLog.sweep).
 */
export const activityQuietMs = 2_000;
/** Grains of one page at most (the largest block size): bounds a resync ask's grain list. */
export const pageGrainsMax = (pageBlocks * Math.max(...blockBytesAllowed)) / grainBytes;
/** Dirty-grain records are written (unsynced) this long after a page's first new mark … */
export const dirtyPersistMs = 200;
/** … or at once when this many pages wait to be written. */
export const dirtyPersistPagesMax = 256;
/**
 * A primary answers a resync ask after this long at most, "running" when the copy is not back in
 * sync yet (the copy asks again and joins the run): so an ask lost in a partition is found out in
 * seconds, not after the time a whole page's paced copy may take.
 */
export const resyncAnswerMsMax = 5_000;
/** A stale copy's resync ask waits this long for the primary's answer. */
export const resyncAskMsMax = 2 * resyncAnswerMsMax;
/** Pages a stale copy resyncs at once, and the backoff between its asks for one page. */
export const resyncPagesInFlightMax = 4;
export const resyncRetryMsMin = 250;
export const resyncRetryMsMax = 8_000;
/** Rounds of "copy what is dirty, then admit under the page lock" before a resync gives up and is asked again. */
export const resyncAdmitRoundsMax = 8;
/**
 * A resync sends contiguous dirty grains in one request of at most this many bytes (a round trip
 * per 64 KiB grain held it near 7 MB/s on a loaded machine) …
 */
export const resyncRunBytesMax = 1024 * 1024;
/** … with this many runs of one page in flight at once, and this many over every page a peer serves. */
export const resyncRunsPerPageMax = 4;
export const resyncRunsInFlightMax = 8;
assert(resyncRunBytesMax % grainBytes === 0 && resyncRunBytesMax <= transferBytesMax, 'a resync run is whole grains and fits one block frame');
assert(resyncRunsPerPageMax <= resyncRunsInFlightMax, 'one page can fill no more than the window');
assert(dirtyPersistMs < activityQuietMs / 2, 'dirty records are written before a sweep could drop their page');
assert(resyncRetryMsMin <= resyncRetryMsMax, 'resync backoff');
assert(resyncAnswerMsMax < resyncAskMsMax, 'a resync ask is answered before its caller gives up');

// -- issue 17, part C: copies kept at the asked count (src/replication/rebuild.ts).
/** A peer unreachable this long is lost: its copies are rebuilt elsewhere (cluster.downOutMs overrides; Ceph's down-out interval). */
export const downOutMsDefault = 600_000;
/** The copy keeper looks at the pages this peer is primary of at least this often (and at every route or volume change). */
export const copyKeeperTickMs = 5_000;
/** Pages of which this peer is primary with a copy being filled (stale, on a live peer): no new copy is added beyond it. */
export const copyBuildPagesInFlightMax = 16;
/** Route changes (compare-and-swap) one keeper run makes; the next run goes on. */
export const copyChangesPerRunMax = 64;
/** Pages one keeper run looks at (a 64 TiB volume has 16 M): the next run resumes where it stopped. */
export const copyKeeperScanPagesMax = 65_536;
assert(downOutMsDefault > 10 * loadStaleMs, 'a peer is lost only long after it is first shown stale');
assert(copyKeeperTickMs >= loadTickMs, 'the keeper looks no more often than gossip refreshes liveness');
/** Route and volume changes within this long start one keeper run, not one each. */
export const copyKeeperKickDelayMs = 200;

// -- issue 18, slice E: copies leaving a peer, capacity spreading (src/replication/rebuild.ts, spread.ts).
/** One-copy pages a keeper moves off a leaving peer at once (page moves, at the migration rate). */
export const evacuationMovesInFlightMax = 2;
/** Capacity hints ("this copy leaves X for Y") a keeper holds at once … */
export const relocationsMax = 64;
/** … each given up if its new copy is not added within this long (no room, page busy): the next spread round plans again. */
export const relocationWaitMsMax = 60_000;
/** A peer stands out when its copies exceed its share by more than this fraction of it (and by more than one copy). */
export const spreadHysteresisShare = 0.1;
/** Copies one peer's spread round starts moving (hints and page moves together). */
export const spreadMovesPerRoundMax = 8;
/**
 * A primary whose page carries at least this load (the balancer's figure: operations a second,
 * 64 KiB counted as one, over 10 s) is the load balancer's to move, not the spread's (spread.ts).
 */
export const spreadBusyPageLoad = 1;
/** Page moves of the spread in flight on one peer; a round waits for them. */
export const spreadPageMovesInFlightMax = 2;
assert(spreadMovesPerRoundMax <= relocationsMax, 'a spread round\'s hints fit the keeper');
assert(relocationWaitMsMax > copyKeeperTickMs * 4, 'a hint outlives several keeper runs');

// -- issue 19, slice S: admin views bounded whatever the volume's size (src/cluster/volume-admin.ts).
/** Pages one page map answer details (`--from/--count`, the JSON pages, the console): about 400 KB of JSON. */
export const pageMapPagesMax = 4096;
/** Changed pages (route not the placement rule's) a page map's summary lists; it counts the rest. */
export const pageMapChangedMax = 64;
assert(pageMapPagesMax * 256 < 4 * 1024 * 1024, 'a page map answer stays far below the gRPC message limit');
