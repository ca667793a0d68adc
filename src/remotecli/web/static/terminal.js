// The web terminal: xterm.js ↔ websocket ↔ a PTY in the user's CLI VM.
// Ensures the CLI VM first (POST /api/v1/vms/ensure: the live one, or a new one), asks for a
// one-time terminal URL, and reconnects (ensuring again) when the connection or the VM goes away.
import { Terminal } from '/static/vendor/xterm/lib/xterm.mjs';
import { FitAddon } from '/static/vendor/xterm-addon-fit/lib/addon-fit.mjs';
import { api } from '/static/common.js';

const $ = (id) => document.getElementById(id);
const encoder = new TextEncoder();

const term = new Terminal({
  cursorBlink: true,
  fontFamily: 'ui-monospace, "DejaVu Sans Mono", "Liberation Mono", Menlo, Consolas, monospace',
  fontSize: 14,
  scrollback: 5000,
  theme: { background: '#0f1320', foreground: '#e6e9f2', cursor: '#8ea2ff' },
});
const fit = new FitAddon();
term.loadAddon(fit);
term.open($('terminal'));
fit.fit();

let ws = null;
let vmId = null;
let attempt = 0;
let exited = false;
let reconnectTimer = null;
let connecting = false;

function setConn(kind, text) {
  const badge = $('term-conn');
  badge.className = 'conn conn-' + kind;
  badge.textContent = text;
}

function overlay(text) {
  if (text === null) {
    $('term-overlay').hidden = true;
    return;
  }
  $('term-overlay').hidden = false;
  $('term-overlay-text').textContent = text;
}

function notice(text) {
  $('term-notice').textContent = text;
  $('term-notice').hidden = !text;
}

function sendResize() {
  if (ws && ws.readyState === WebSocket.OPEN) {
    ws.send(JSON.stringify({ type: 'resize', cols: term.cols, rows: term.rows }));
  }
}

term.onResize(sendResize);
term.onData((data) => {
  if (ws && ws.readyState === WebSocket.OPEN) ws.send(encoder.encode(data));
});
new ResizeObserver(() => { try { fit.fit(); } catch (err) { /* not visible */ } }).observe($('terminal'));

function scheduleReconnect(reason) {
  if (reconnectTimer) return;
  attempt += 1;
  const delay = Math.min(15000, 1000 * 2 ** Math.min(attempt, 4));
  setConn('bad', 'Disconnected');
  overlay(reason + ` Reconnecting in ${Math.round(delay / 1000)} s…`);
  $('term-reconnect').hidden = false;
  reconnectTimer = setTimeout(() => { reconnectTimer = null; connect(); }, delay);
}

async function connect() {
  if (connecting) return;
  connecting = true;
  if (reconnectTimer) { clearTimeout(reconnectTimer); reconnectTimer = null; }
  exited = false;
  $('term-reconnect').hidden = true;
  setConn('busy', 'Connecting…');
  overlay('Connecting to your workspace…');
  let slow = null;
  try {
    // What ensure is about to do (create a VM, start a stopped one, or nothing), said in words
    // while it runs; ensure itself answers only when the VM is ready.
    const { data: state } = await api('GET', '/dashboard/remote-cli/terminal/state');
    setConn('busy', state.status);
    overlay(state.message);
    if (state.phase === 'connect') {
      slow = setTimeout(() => overlay(
        'Preparing your workspace. Starting a VM can take a minute or two; this page connects by itself.'), 2500);
    }
    const previous = vmId;
    const { status, data: vm } = await api('POST', '/api/v1/vms/ensure', { vm_type: 'cli' });
    if (status === 201) {
      notice(previous || state.has_home
        ? 'Your CLI workspace had stopped, so a new VM was made for it. Your home came with it: your files and CLI sign-ins are where you left them.'
        : 'Your workspace was created. Files you keep in your home stay when its VM is stopped, rebuilt or replaced.');
    }
    vmId = vm.id;
    const { data: ticket } = await api('POST', `/api/v1/vms/${encodeURIComponent(vm.id)}/terminal`);
    open(ticket.url + `&cols=${term.cols}&rows=${term.rows}`);
  } catch (err) {
    scheduleReconnect(err.message);
  } finally {
    if (slow) clearTimeout(slow);
    connecting = false;
  }
}

function open(url) {
  const socket = new WebSocket(url);
  socket.binaryType = 'arraybuffer';
  ws = socket;
  socket.onopen = () => {
    attempt = 0;
    overlay(null);
    setConn('ok', 'Connected');
    term.focus();
  };
  socket.onmessage = (event) => {
    if (typeof event.data === 'string') {
      let message = null;
      try { message = JSON.parse(event.data); } catch (err) { return; }
      if (message && message.type === 'exit') {
        exited = true;
        const how = message.signal ? `signal ${message.signal}` : `exit code ${message.code}`;
        term.write(`\r\n\x1b[2m[The shell ended (${how}).]\x1b[0m\r\n`);
      }
      return;
    }
    term.write(new Uint8Array(event.data));
  };
  socket.onclose = (event) => {
    if (ws !== socket) return;
    ws = null;
    if (exited) {
      setConn('idle', 'Shell ended');
      $('term-reconnect').textContent = 'Start a new shell';
      $('term-reconnect').hidden = false;
      return;
    }
    const why = {
      4409: 'Your workspace is not running; it is being started again.',
      4404: 'That CLI VM is gone; preparing your workspace.',
      4401: 'The connection link expired.',
    }[event.code] || 'The connection to your CLI workspace was lost.';
    scheduleReconnect(why);
  };
}

$('term-reconnect').addEventListener('click', () => {
  $('term-reconnect').textContent = 'Reconnect';
  attempt = 0;
  connect();
});

connect();
