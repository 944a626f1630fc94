// peersan console: plain browser JavaScript, no libraries. Everything it shows comes from this
// peer's /api (Authorization: Bearer <admin token>, kept in sessionStorage for this tab only).
// Live refresh: /api/events is a server-sent event stream read with fetch() (EventSource
// cannot send the token header): `state` every couple of seconds, `event` as things happen.
// Data is always put into the page with textContent, never as HTML.
'use strict';

const tokenKey = 'peersan.adminToken';
const palette = ['#3b7dd8', '#e0823d', '#3aa35b', '#c8463d', '#8a5cc7', '#1fa3a3', '#c7a22b', '#d35f9e',
  '#5e6e8c', '#7fb33a', '#b5651d', '#2b8cbe', '#a63a6b', '#6b8e23', '#9c7a3c', '#4b4fa8'];
const mapCellsMax = 16384;
/** Pages of the map asked at once (the peer answers at most pageMapPagesMax, src/limits.ts): ◀ ▶ page through a larger volume. */
const mapPagesShown = 4096;
const eventsShownMax = 200;

const ui = {
  state: null,
  previous: null,
  rate: null,
  selected: null,
  map: null,
  heat: null,
  mapGroup: 1,
  /** First page of the map shown. */
  mapFrom: 0,
  streamAbort: null,
  seenSeq: 0,
};

const $ = (id) => document.getElementById(id);

function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === 'class') e.className = v;
    else if (k === 'style') Object.assign(e.style, v); // CSSOM: allowed by the page's CSP, unlike style attributes
    else if (k.startsWith('on')) e.addEventListener(k.slice(2), v);
    else e.setAttribute(k, v);
  }
  for (const c of children) if (c !== undefined && c !== null) e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return e;
}

function bytes(n) {
  if (!Number.isFinite(n)) return '—';
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB', 'PiB'];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return `${n >= 100 || i === 0 ? Math.round(n) : n.toFixed(1)} ${units[i]}`;
}

function duration(ms) {
  const s = Math.round(ms / 1000);
  if (s < 120) return `${s}s`;
  if (s < 7200) return `${Math.round(s / 60)}m`;
  return `${Math.round(s / 3600)}h`;
}

function peerColour(peer) {
  const peers = ui.state ? ui.state.peers.map((p) => p.id) : [];
  const i = peers.indexOf(peer);
  return palette[(i < 0 ? peers.length : i) % palette.length];
}

// ---- API -------------------------------------------------------------------------------

class ApiError extends Error {
  constructor(status, message) { super(message); this.status = status; }
}

async function api(method, path, body) {
  const headers = { Authorization: `Bearer ${sessionStorage.getItem(tokenKey) || ''}` };
  if (body !== undefined) headers['Content-Type'] = 'application/json';
  const res = await fetch(`/api/${path}`, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
  const data = await res.json().catch(() => ({ error: `${res.status} ${res.statusText}` }));
  if (res.status === 401) askToken('The token was refused.');
  if (!res.ok) throw new ApiError(res.status, data.error || `${res.status} ${res.statusText}`);
  return data;
}

/** Run an operation from a form: disable the button, say the outcome in `out`. */
async function act(form, out, fn, done) {
  const button = form.querySelector('button[type=submit]');
  out.textContent = '…';
  out.className = '';
  if (button) button.disabled = true;
  try {
    const result = await fn();
    out.textContent = done(result);
    out.className = 'ok';
    refreshSoon();
  } catch (err) {
    out.textContent = err.message;
    out.className = 'error';
  } finally {
    if (button) button.disabled = false;
  }
}

// ---- token -----------------------------------------------------------------------------

function askToken(message) {
  stopStream();
  $('main').hidden = true;
  $('sign-out').hidden = true;
  $('token-error').textContent = message || '';
  $('token-input').value = '';
  if (!$('token-dialog').open) $('token-dialog').showModal();
  $('token-input').focus();
}

async function useToken(token) {
  sessionStorage.setItem(tokenKey, token);
  try {
    render(await api('GET', 'status'));
  } catch (err) {
    if (err.status !== 401) askToken(err.message);
    return;
  }
  $('token-dialog').close();
  $('main').hidden = false;
  $('sign-out').hidden = false;
  startStream();
}

// ---- live stream -----------------------------------------------------------------------

function stopStream() {
  if (ui.streamAbort) ui.streamAbort.abort();
  ui.streamAbort = null;
  setLive(false);
}

function setLive(on, text) {
  $('live').className = `live ${on ? 'on' : 'off'}`;
  $('live').textContent = text || (on ? 'live' : 'offline');
}

async function startStream() {
  stopStream();
  const abort = new AbortController();
  ui.streamAbort = abort;
  try {
    const res = await fetch(`/api/events?after=${ui.seenSeq}`, { headers: { Authorization: `Bearer ${sessionStorage.getItem(tokenKey) || ''}` }, signal: abort.signal });
    if (res.status === 401) return askToken('The token was refused.');
    if (!res.ok || !res.body) throw new Error(`${res.status}`);
    setLive(true);
    const reader = res.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = '';
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += value;
      let cut;
      while ((cut = buffer.indexOf('\n\n')) >= 0) {
        onFrame(buffer.slice(0, cut));
        buffer = buffer.slice(cut + 2);
      }
    }
  } catch (err) {
    if (abort.signal.aborted) return;
  }
  if (ui.streamAbort !== abort) return;
  setLive(false, 'reconnecting…');
  setTimeout(() => { if (ui.streamAbort === abort) startStream(); }, 3000);
}

function onFrame(frame) {
  let type = 'message';
  let data = '';
  for (const line of frame.split('\n')) {
    if (line.startsWith('event: ')) type = line.slice(7);
    else if (line.startsWith('data: ')) data += line.slice(6);
  }
  if (!data) return;
  const payload = JSON.parse(data);
  if (type === 'state') render(payload);
  if (type === 'event') addEvent(payload);
}

let refreshTimer = null;
/** After an operation: fetch the state now rather than at the next push. */
function refreshSoon() {
  clearTimeout(refreshTimer);
  refreshTimer = setTimeout(async () => {
    try { render(await api('GET', 'status')); } catch { /* the stream will bring it */ }
  }, 150);
}

// ---- rendering ---------------------------------------------------------------------------

function render(state) {
  if (ui.state && state.atMs > ui.state.atMs) {
    const dt = (state.atMs - ui.state.atMs) / 1000;
    ui.rate = {
      iops: Math.max(0, (state.hostIo.ops - ui.state.hostIo.ops) / dt),
      bytesPerSec: Math.max(0, (state.hostIo.bytes - ui.state.hostIo.bytes) / dt),
    };
  }
  ui.state = state;
  $('cluster-name').textContent = `cluster ${state.cluster} · console served by ${state.self}`;
  renderPeers(state);
  renderVolumes(state);
  renderBalancer(state);
  renderMigrations(state);
  if (ui.selected && !state.volumes.some((v) => v.name === ui.selected)) selectVolume(null);
  if (ui.selected) renderVolume(state.volumes.find((v) => v.name === ui.selected));
}

function sessionsOf(state, targetName) {
  return state.peers.flatMap((p) => p.sessions.filter((s) => s.sessionType === 'Normal' && (!targetName || s.targetName === targetName)));
}

// A peer's stored page copies against its share of them (capacity spreading): "85 of 64 (133%)".
function fillText(f) {
  if (!f) return '—';
  if (!(f.shareCopies > 0)) return `${f.copies} (takes none)`;
  return `${f.copies} of ${Math.round(f.shareCopies)} (${Math.round((f.copies / f.shareCopies) * 100)}%)`;
}

/** A member state worth showing beside up/down: joining, draining, leaving (plain up says nothing more). */
function memberState(p) {
  return p.state && p.state !== 'up' ? p.state : '';
}

function renderPeers(state) {
  const r = ui.rate;
  $('host-io').textContent = `Host I/O arriving at ${state.self}: ${r ? `${Math.round(r.iops)} IOPS · ${bytes(r.bytesPerSec)}/s` : 'measuring…'}` +
    ` (${state.hostIo.ops} operations, ${bytes(state.hostIo.bytes)} since start)`;
  const tbody = $('peers').tBodies[0];
  tbody.replaceChildren(...state.peers.map((p) => {
    const normal = p.sessions.filter((s) => s.sessionType === 'Normal').length;
    const load = p.load ? `${Math.round(p.load.iops)} IOPS · ${bytes(p.load.bytesPerSec)}/s` : '—';
    return el('tr', { 'data-peer': p.id },
      el('td', {}, el('span', { class: 'swatch', style: { background: peerColour(p.id) } }), p.id, p.id === state.self ? ' (this peer)' : ''),
      el('td', {}, el('span', { class: `badge ${p.up ? 'up' : 'down'}${memberState(p) ? ' member' : ''}` }, [p.up ? 'up' : 'down', memberState(p)].filter(Boolean).join(' · '))),
      el('td', {}, p.iscsi),
      el('td', { class: 'num' }, p.up ? p.volumes : '—'),
      el('td', { class: 'num', 'data-field': 'sessions' }, p.up ? normal : '—'),
      el('td', { class: 'num', 'data-field': 'used' }, p.up ? bytes(p.allocatedBytes) : '—'),
      el('td', { class: 'num' }, p.up ? bytes(p.freeBytes) : '—'),
      el('td', { class: 'num', 'data-field': 'load' }, load),
      el('td', { class: 'num', 'data-field': 'fill' }, fillText(p.fill)),
      el('td', { class: 'num' }, p.up ? duration(p.uptimeMs) : '—'));
  }));
  $('load-note').hidden = state.features.peerLoads;
}

function accessText(v) {
  const who = v.allow.length ? `${v.allow.length} initiator${v.allow.length > 1 ? 's' : ''}` : 'any initiator';
  return who + (v.chapEnabled ? (v.mutualChap ? ', mutual CHAP' : ', CHAP') : '');
}

function renderVolumes(state) {
  $('used-head').textContent = `Used on ${state.self}`;
  const tbody = $('volumes').tBodies[0];
  if (state.volumes.length === 0) {
    tbody.replaceChildren(el('tr', {}, el('td', { colspan: 9, class: 'note' }, 'No volumes yet: create one below.')));
    return;
  }
  tbody.replaceChildren(...state.volumes.map((v) => el('tr', { 'data-volume': v.name, class: v.name === ui.selected ? 'selected' : '' },
    el('td', {}, el('button', { type: 'button', class: 'link', onclick: () => selectVolume(v.name) }, v.name)),
    el('td', { class: 'num' }, bytes(v.sizeBytes)),
    el('td', { class: 'num' }, v.blockBytes),
    el('td', { class: 'num' }, bytes(v.allocatedBytes)),
    el('td', {}, v.peers.join(', ')),
    el('td', { 'data-field': 'protection', title: protectionTitle(v) }, `${v.replicas || 1} · ${v.protection || '-'}`),
    el('td', { class: 'num' }, sessionsOf(state, v.targetName).length),
    el('td', {}, accessText(v)),
    el('td', {}, el('button', { type: 'button', class: 'quiet link', onclick: () => selectVolume(v.name) }, 'details')))));
}

/** The counts behind a volume's protection state (pages degraded, rebuilding, unavailable). */
function protectionTitle(v) {
  const d = v.protectionDetail;
  if (!d) return '';
  const eta = d.etaSeconds >= 0 ? `, ETA ${d.etaSeconds} s` : '';
  return `${d.pages} pages, ${d.wanted} copies each asked: ${d.degradedPages} degraded, ${d.rebuildingPages} rebuilding (${d.progressPercent}%${eta}), ${d.unavailablePages} unavailable`;
}

function renderBalancer(state) {
  const can = state.features.setRebalancing;
  $('balancer-state').textContent = state.rebalancing ? (state.rebalancing.enabled ? 'running' : 'stopped') : '—';
  $('balancer-start').disabled = !can;
  $('balancer-stop').disabled = !can;
  $('balancer-note').textContent = can ? '' : 'Rebalancing is not available on this peer yet.';
}

async function renderMigrations(state) {
  const box = $('migrations');
  if (!state.features.listMigrations) {
    box.replaceChildren(el('p', { class: 'note' }, 'The migrations list is not available on this peer yet.'));
    return;
  }
  let list;
  try {
    list = (await api('GET', 'migrations')).migrations;
  } catch (err) {
    box.replaceChildren(el('p', { class: 'error' }, err.message));
    return;
  }
  if (list.length === 0) {
    box.replaceChildren(el('p', { class: 'note' }, 'No page is moving.'));
    return;
  }
  box.replaceChildren(el('table', {},
    el('thead', {}, el('tr', {}, ...['Volume', 'Page', 'From', 'To', 'State', 'Progress'].map((h) => el('th', {}, h)))),
    el('tbody', {}, ...list.map((m) => {
      const pct = m.pieces ? Math.round((100 * m.done) / m.pieces) : 0;
      return el('tr', {}, el('td', {}, m.volume), el('td', { class: 'num' }, m.page), el('td', {}, m.from), el('td', {}, m.to), el('td', {}, m.state),
        el('td', {}, el('div', { class: 'progress', title: `${m.done}/${m.pieces} pieces` }, el('div', { style: { width: `${pct}%` } }))));
    }))));
}

// ---- one volume ------------------------------------------------------------------------------

function selectVolume(name) {
  ui.selected = name;
  ui.map = null;
  ui.mapFrom = 0;
  ui.heat = null;
  $('volume-panel').hidden = !name;
  for (const id of ['move-result', 'resize-result', 'access-result', 'snapshot-result', 'delete-result']) $(id).textContent = '';
  if (!name || !ui.state) return;
  renderVolumes(ui.state);
  const v = ui.state.volumes.find((x) => x.name === name);
  const form = $('access-form');
  form.allow.value = v.allow.join('\n');
  form.chapUser.value = v.chapUser;
  form.chapSecret.value = '';
  form.chapOff.checked = false;
  renderVolume(v);
  $('volume-panel').scrollIntoView({ behavior: 'smooth', block: 'start' });
}

async function renderVolume(v) {
  const state = ui.state;
  $('vol-name').textContent = v.name;
  const facts = [
    ['target', v.targetName], ['size', `${bytes(v.sizeBytes)} (${v.sizeBytes / v.blockBytes} blocks of ${v.blockBytes})`],
    ['placed on', v.peers.join(', ')], ['access', accessText(v) + (v.chapEnabled ? ` (user ${v.chapUser})` : '')],
    ['hosts', String(sessionsOf(state, v.targetName).length)], ['created', new Date(v.createdAtMs).toLocaleString()],
  ];
  $('vol-facts').replaceChildren(...facts.flatMap(([k, val]) => [el('dt', {}, k), el('dd', {}, val)]));
  const to = $('move-form').to;
  const current = to.value;
  to.replaceChildren(...state.peers.map((p) => el('option', { value: p.id }, p.id)));
  if (current) to.value = current;
  $('move-form').querySelector('button').disabled = !state.features.movePage;
  $('access-form').querySelector('button').disabled = !state.features.setVolumeAccess;
  $('snapshot-form').querySelector('button').disabled = !state.features.createSnapshot;
  if (!state.features.movePage) $('move-result').textContent = 'Moving pages is not available on this peer yet.';
  if (!state.features.setVolumeAccess) $('access-result').textContent = 'Changing access is not available on this peer yet.';
  await Promise.all([loadMap(v.name), loadSnapshots(v.name)]);
}

async function loadMap(name) {
  try {
    const [map, heat] = await Promise.all([
      api('GET', `volumes/${encodeURIComponent(name)}/pagemap?from=${ui.mapFrom}&count=${mapPagesShown}`),
      ui.state.features.pageHeat ? api('GET', `volumes/${encodeURIComponent(name)}/heat`).catch(() => null) : null,
    ]);
    if (ui.selected !== name) return;
    ui.map = map;
    ui.heat = heat;
    drawMap();
  } catch (err) {
    $('heat-note').textContent = err.message;
  }
}

async function loadSnapshots(name) {
  const list = $('snapshots');
  if (!ui.state.features.listSnapshots) {
    list.replaceChildren(el('li', { class: 'note' }, 'Snapshots are not available on this peer yet.'));
    return;
  }
  try {
    const { snapshots } = await api('GET', `volumes/${encodeURIComponent(name)}/snapshots`);
    list.replaceChildren(...(snapshots.length ? snapshots.map((s) => el('li', {},
      `${s.name} · ${new Date(s.createdAtMs).toLocaleString()}${s.mode ? ` · ${s.mode}` : ''}${s.mode === 'timestamp' ? ' · host I/O not held' : s.heldMs !== undefined ? ` · hosts held ${s.heldMs} ms` : ''}${s.targetName ? ` · ${s.targetName}` : ''} `,
      el('button', { type: 'button', class: 'link', onclick: () => deleteSnapshot(name, s.name), disabled: ui.state.features.deleteSnapshot ? null : '' }, 'delete'))) : [el('li', { class: 'note' }, 'No snapshots.')]));
  } catch (err) {
    list.replaceChildren(el('li', { class: 'error' }, err.message));
  }
}

async function deleteSnapshot(volume, snap) {
  try {
    await api('DELETE', `volumes/${encodeURIComponent(volume)}/snapshots/${encodeURIComponent(snap)}`);
    $('snapshot-result').textContent = `deleted ${snap}`;
    loadSnapshots(volume);
  } catch (err) {
    $('snapshot-result').textContent = err.message;
    $('snapshot-result').className = 'error';
  }
}

function mapLayout() {
  const n = ui.map.pages.length;
  const group = Math.max(1, Math.ceil(n / mapCellsMax));
  const cells = Math.ceil(n / group);
  const canvas = $('page-map');
  const width = Math.max(320, Math.min(900, canvas.parentElement.clientWidth || 640));
  // Roughly three columns per row for small maps, at most 64 columns for large ones.
  const cols = Math.min(cells, Math.max(8, Math.min(64, Math.ceil(Math.sqrt(cells * 3)))));
  const cell = Math.max(3, Math.min(22, Math.floor(width / cols)));
  const rows = Math.ceil(cells / cols);
  return { n, group, cells, cols, rows, cell };
}

function drawMap() {
  const map = ui.map;
  const canvas = $('page-map');
  const L = mapLayout();
  ui.mapGroup = L.group;
  canvas.width = L.cols * L.cell;
  canvas.height = L.rows * L.cell;
  const g = canvas.getContext('2d');
  g.clearRect(0, 0, canvas.width, canvas.height);
  // Counts of the whole volume (the peer sums them from its placement rule), cells of the range shown.
  const counts = new Map(map.perPeer.filter((p) => p.primaries > 0).map((p) => [p.peer, p.primaries]));
  const heatOf = new Map((ui.heat ? ui.heat.pages : []).map((h) => [h.page, h.iops]));
  const heatMax = Math.max(0, ...heatOf.values());
  const gap = L.cell >= 6 ? 1 : 0;
  for (let c = 0; c < L.cells; c++) {
    const first = c * L.group;
    const x = (c % L.cols) * L.cell;
    const y = Math.floor(c / L.cols) * L.cell;
    g.fillStyle = peerColour(map.pages[first].owner);
    g.fillRect(x, y, L.cell - gap, L.cell - gap);
    let heat = 0;
    for (let p = first; p < Math.min(first + L.group, L.n); p++) heat = Math.max(heat, heatOf.get(map.from + p) || 0);
    if (heatMax > 0 && heat > 0) {
      // Heat as a bright dot whose size and strength follow the page's share of the hottest page.
      const f = Math.sqrt(heat / heatMax);
      const r = Math.max(1, (L.cell - gap) * 0.45 * f);
      g.fillStyle = `rgba(255, 235, 59, ${0.35 + 0.65 * f})`;
      g.beginPath();
      g.arc(x + (L.cell - gap) / 2, y + (L.cell - gap) / 2, r, 0, 2 * Math.PI);
      g.fill();
    }
  }
  canvas.dataset.pages = String(map.totalPages);
  canvas.dataset.from = String(map.from);
  $('map-range').hidden = map.from === 0 && map.next === undefined;
  $('map-range-text').textContent = `pages ${map.from}–${map.from + L.n - 1} of ${map.totalPages}`;
  $('map-prev').disabled = map.from === 0;
  $('map-next').disabled = map.next === undefined;
  canvas.dataset.owners = [...counts.entries()].sort().map(([o, k]) => `${o}:${k}`).join(',');
  canvas.dataset.heatMax = String(heatMax);
  $('legend').replaceChildren(...[...counts.entries()].sort().map(([o, k]) =>
    el('span', { 'data-owner': o }, el('span', { class: 'swatch', style: { background: peerColour(o) } }), `${o}: ${k} page${k > 1 ? 's' : ''}`)),
    ...(L.group > 1 ? [el('span', { class: 'note' }, `(one cell = ${L.group} pages)`)] : []));
  const moved = map.changedPages;
  $('heat-note').textContent = (ui.state.features.pageHeat
    ? (ui.heat ? `Heat: yellow dots, by IOPS over the last ${Math.round(ui.heat.windowMs / 1000)} s (hottest page ${Math.round(heatMax)} IOPS).` : 'Heat: could not be read.')
    : 'Heat (per-page IOPS) is not available on this peer yet.') + (moved ? ` ${moved} page(s) moved since placement.` : '');
}

function pageAt(ev) {
  if (!ui.map) return undefined;
  const canvas = $('page-map');
  const rect = canvas.getBoundingClientRect();
  const L = mapLayout();
  const x = Math.floor(((ev.clientX - rect.left) * (canvas.width / rect.width)) / L.cell);
  const y = Math.floor(((ev.clientY - rect.top) * (canvas.height / rect.height)) / L.cell);
  const c = y * L.cols + x;
  if (x < 0 || x >= L.cols || c < 0 || c >= L.cells) return undefined;
  return ui.map.from + c * L.group;
}

function describePage(page) {
  const p = ui.map.pages[page - ui.map.from];
  const heat = ui.heat && ui.heat.pages.find((h) => h.page === page);
  const first = page * ui.map.pageBlocks;
  // Replicated pages: every copy, primary first, the ones still resyncing marked.
  const copies = (p.copies || []).length > 1 ? ` · copies ${p.copies.map((c) => ((p.inSync || p.copies).includes(c) ? c : `${c} (stale)`)).join(', ')}` : '';
  return `page ${page}${ui.mapGroup > 1 ? `–${Math.min(page + ui.mapGroup, ui.map.from + ui.map.pages.length) - 1}` : ''} · owner ${p.owner}${copies} · route v${p.version} · blocks ${first}–${first + ui.map.pageBlocks - 1}` +
    (heat ? ` · ${Math.round(heat.iops)} IOPS` : '');
}

// ---- events ----------------------------------------------------------------------------------

function addEvent(e) {
  if (e.seq <= ui.seenSeq) return;
  ui.seenSeq = e.seq;
  const list = $('events');
  list.prepend(el('li', { 'data-kind': e.kind }, el('time', {}, new Date(e.atMs).toLocaleTimeString()), el('span', { class: 'kind' }, e.kind), e.message));
  while (list.children.length > eventsShownMax) list.lastChild.remove();
  if (e.kind.startsWith('volume') || e.kind === 'page-moved' || e.kind === 'migration') refreshSoon();
}

// ---- forms ---------------------------------------------------------------------------------

function lines(text) {
  return text.split(/[\n,]/).map((s) => s.trim()).filter(Boolean);
}

function wire() {
  $('token-form').addEventListener('submit', (ev) => {
    ev.preventDefault();
    useToken($('token-input').value.trim());
  });
  $('sign-out').addEventListener('click', () => {
    sessionStorage.removeItem(tokenKey);
    askToken('');
  });

  const create = $('create-form');
  create.addEventListener('submit', (ev) => {
    ev.preventDefault();
    const f = create.elements;
    const chap = f.chapUser.value || f.chapSecret.value || f.mutualUser.value || f.mutualSecret.value
      ? { user: f.chapUser.value, secret: f.chapSecret.value, mutualUser: f.mutualUser.value, mutualSecret: f.mutualSecret.value } : undefined;
    const body = { name: f.name.value.trim(), size: f.size.value.trim(), blockBytes: Number(f.blockBytes.value), allow: lines(f.allow.value), peers: lines(f.peers.value), chap, replicas: f.replicas.value ? Number(f.replicas.value) : undefined };
    act(create, $('create-result'), () => api('POST', 'volumes', body), (v) => {
      // Secrets leave the page once sent.
      create.reset();
      return `created ${v.name} (${bytes(v.sizeBytes)}, ${v.replicas} ${v.replicas === 1 ? 'copy' : 'copies'} of each page) on ${v.peers.join(', ')}: ${v.targetName}`;
    });
  });

  const resize = $('resize-form');
  resize.addEventListener('submit', (ev) => {
    ev.preventDefault();
    const name = ui.selected;
    act(resize, $('resize-result'), () => api('POST', `volumes/${encodeURIComponent(name)}/resize`, { size: resize.size.value.trim() }), (v) => `${v.name} is now ${bytes(v.sizeBytes)}`);
  });

  const del = $('delete-form');
  del.addEventListener('submit', (ev) => {
    ev.preventDefault();
    const name = ui.selected;
    if (!window.confirm(`Delete volume ${name} and all its data?`)) return;
    act(del, $('delete-result'), () => api('DELETE', `volumes/${encodeURIComponent(name)}${del.force.checked ? '?force=1' : ''}`), () => {
      selectVolume(null);
      return `deleted ${name}`;
    });
  });

  const access = $('access-form');
  access.addEventListener('submit', (ev) => {
    ev.preventDefault();
    const name = ui.selected;
    const f = access.elements;
    let chap;
    if (f.chapOff.checked) chap = null;
    else if (f.chapSecret.value) chap = { user: f.chapUser.value, secret: f.chapSecret.value };
    act(access, $('access-result'), () => api('PUT', `volumes/${encodeURIComponent(name)}/access`, { allow: lines(f.allow.value), chap }), (v) => {
      f.chapSecret.value = '';
      return `access of ${v.name}: ${accessText(v)}`;
    });
  });

  const snap = $('snapshot-form');
  snap.addEventListener('submit', (ev) => {
    ev.preventDefault();
    const name = ui.selected;
    act(snap, $('snapshot-result'), () => api('POST', `volumes/${encodeURIComponent(name)}/snapshots`, { name: snap.elements.name.value.trim() || undefined, mode: snap.mode.value }), (s) => {
      loadSnapshots(name);
      return `snapshot ${s.name} taken`;
    });
  });

  const move = $('move-form');
  move.addEventListener('submit', (ev) => {
    ev.preventDefault();
    const name = ui.selected;
    const page = Number(move.page.value);
    act(move, $('move-result'), () => api('POST', `volumes/${encodeURIComponent(name)}/pages/${page}/move`, { to: move.to.value }), () => `moving page ${page} to ${move.to.value}`);
  });

  for (const [id, enabled] of [['balancer-start', true], ['balancer-stop', false]]) {
    $(id).addEventListener('click', async () => {
      try {
        await api('PUT', 'rebalancing', { enabled });
        refreshSoon();
      } catch (err) {
        $('balancer-note').textContent = err.message;
      }
    });
  }

  // ◀ ▶: the previous or next range of the map of a volume larger than one answer.
  for (const [id, step] of [['map-prev', -1], ['map-next', 1]]) {
    $(id).addEventListener('click', () => {
      if (!ui.map || !ui.selected) return;
      ui.mapFrom = step > 0 ? ui.map.next ?? ui.map.from : Math.max(0, ui.map.from - mapPagesShown);
      loadMap(ui.selected);
    });
  }

  const canvas = $('page-map');
  canvas.addEventListener('mousemove', (ev) => {
    const page = pageAt(ev);
    $('map-hover').textContent = page === undefined ? '\u00a0' : describePage(page);
  });
  canvas.addEventListener('click', (ev) => {
    const page = pageAt(ev);
    if (page !== undefined) move.page.value = String(page);
  });
}

wire();
if (sessionStorage.getItem(tokenKey)) useToken(sessionStorage.getItem(tokenKey));
else askToken('');
