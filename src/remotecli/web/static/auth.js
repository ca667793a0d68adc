// The sign-in page: start a session, follow its steps, show the Browser VM's screen with noVNC
// while the user logs in, then the result. Polls the dashboard's state endpoint; asks the REST
// API for a fresh one-time VNC URL only when it (re)connects the screen. Leaving the page cancels
// nothing: the session can be resumed with ?session=<id> until it expires.
import RFB from '/static/vendor/novnc/core/rfb.js';
import { api, sleep } from '/static/common.js';

const app = document.getElementById('auth-app');
const $ = (id) => document.getElementById(id);
const POLL_MS = 1500;

let sessionId = app.dataset.session || '';
let current = null;         // the last session state seen
let rfb = null;             // the noVNC connection, while the user must log in
let connecting = false;
let pollGeneration = 0;

const END_TITLES = {
  failed: 'Sign-in failed',
  expired: 'Sign-in expired',
  cancelled: 'Sign-in cancelled',
};

function setChooserBusy(busy, name) {
  for (const button of document.querySelectorAll('.provider-choice')) {
    button.disabled = busy;
    if (busy && button.dataset.provider === name) {
      button.querySelector('.provider-choice-id').textContent = 'Starting…';
    }
  }
}

async function start(provider) {
  const error = $('start-error');
  error.hidden = true;
  setChooserBusy(true, provider);
  try {
    const { data } = await api('POST', '/api/v1/auth-sessions', { provider });
    sessionId = data.id;
    history.replaceState(null, '', '/dashboard/remote-cli/auth?session=' + encodeURIComponent(sessionId));
    resetFlow();
    $('chooser').hidden = true;
    $('flow').hidden = false;
    follow();
  } catch (err) {
    error.textContent = err.message;
    error.hidden = false;
  } finally {
    setChooserBusy(false);
    for (const button of document.querySelectorAll('.provider-choice')) {
      button.querySelector('.provider-choice-id').innerHTML = '';
      const code = document.createElement('code');
      code.textContent = button.dataset.provider;
      button.querySelector('.provider-choice-id').appendChild(code);
    }
  }
}

function resetFlow() {
  current = null;
  $('result-ok').hidden = true;
  $('result-bad').hidden = true;
  $('screen-card').hidden = true;
  $('flow-message').textContent = 'Starting…';
  $('flow-title').textContent = 'Signing in…';
  for (const li of document.querySelectorAll('#steps .step')) li.className = 'step step-todo';
}

function minutes(seconds) {
  if (seconds < 60) return 'less than a minute';
  const m = Math.round(seconds / 60);
  return m + ' min';
}

function render(state) {
  const s = state.session;
  current = s;
  const name = s.provider_name || s.provider;
  $('flow-title').textContent = 'Sign in to ' + name;
  for (const step of state.steps) {
    const li = document.querySelector(`#steps [data-step="${step.key}"]`);
    if (li) {
      li.className = 'step step-' + step.state;
      const words = li.querySelector('span:last-child');
      if (words && step.label) words.textContent = step.label;  // e.g. "Secure browser ready" (warm pool)
    }
  }
  $('flow-message').textContent = s.status === 'failed' ? 'The sign-in stopped.' : (s.message || '');
  $('flow-expiry').textContent = !state.terminal && state.expires_in_s != null
    ? 'Expires in ' + minutes(state.expires_in_s) : '';
  $('cancel-btn').hidden = state.terminal;

  const preparing = s.status === 'pending' || s.status === 'provisioning';
  const live = s.status === 'awaiting_user';
  $('screen-card').hidden = !(preparing || live);
  $('screen-card').classList.toggle('live', live);
  if (live) {
    connectScreen();
  } else {
    disconnectScreen();
    $('screen-state').textContent = preparing ? 'Starting…' : '';
    showPlaceholder('The secure browser is starting. Its screen appears here, usually within a minute or two.');
  }

  if (s.status === 'completed') {
    $('ok-title').textContent = name + ' is signed in';
    $('ok-provider').textContent = name;
    $('ok-account').textContent = (s.credential && s.credential.account) || 'Not reported by the provider';
    $('ok-expiry').textContent = state.credential_expires || 'Not reported';
    $('result-ok').hidden = false;
    $('flow-message').textContent = s.message || 'Done';
  } else if (state.terminal) {
    $('bad-title').textContent = END_TITLES[s.status] || 'Sign-in did not finish';
    $('bad-message').textContent = s.error_message || s.message || 'The sign-in ended.';
    $('bad-code').textContent = s.error_code ? 'Code: ' + s.error_code : '';
    $('result-bad').hidden = false;
  }
}

async function connectScreen() {
  if (rfb || connecting || !sessionId) return;
  connecting = true;
  $('screen-state').textContent = 'Connecting…';
  showPlaceholder('Connecting to the secure browser…');
  try {
    // ?vnc=1 issues a one-time ticket: asked for only here, when (re)connecting the screen.
    const { data } = await api('GET', '/api/v1/auth-sessions/' + encodeURIComponent(sessionId) + '?vnc=1');
    if (!data.vnc_url || data.status !== 'awaiting_user') return;
    const screen = $('screen');
    const connection = new RFB(screen, data.vnc_url, { wsProtocols: ['binary'] });
    connection.scaleViewport = true;
    connection.resizeSession = false;
    connection.focusOnClick = true;
    connection.background = '#0f1320';
    connection.addEventListener('connect', () => {
      $('screen-state').textContent = 'Connected: click the screen, then type';
      $('screen-placeholder').hidden = true;
      connection.focus();
    });
    connection.addEventListener('disconnect', () => {
      if (rfb === connection) rfb = null;
      if (current && current.status === 'awaiting_user') {
        $('screen-state').textContent = 'Connection lost; reconnecting…';
        showPlaceholder('The connection to the secure browser was lost; reconnecting…');
        setTimeout(connectScreen, 1500);
      }
    });
    rfb = connection;
  } catch (err) {
    $('screen-state').textContent = err.message;
    setTimeout(connectScreen, 3000);
  } finally {
    connecting = false;
  }
}

function showPlaceholder(text) {
  $('screen-placeholder-text').textContent = text;
  $('screen-placeholder').hidden = false;
}

function disconnectScreen() {
  if (rfb) {
    const connection = rfb;
    rfb = null;
    try { connection.disconnect(); } catch (err) { /* already closed */ }
  }
}

async function follow() {
  const generation = ++pollGeneration;
  let failures = 0;
  while (generation === pollGeneration) {
    try {
      const { data } = await api('GET', `/dashboard/remote-cli/auth/${encodeURIComponent(sessionId)}/state`);
      failures = 0;
      render(data);
      if (data.terminal) return;
    } catch (err) {
      if (err.status === 404) {
        $('flow-message').textContent = err.message;
        $('bad-title').textContent = 'No such sign-in';
        $('bad-message').textContent = 'This sign-in does not exist or is not yours. Start a new one.';
        $('result-bad').hidden = false;
        return;
      }
      failures += 1;
      $('flow-message').textContent = err.message + (failures > 1 ? ' (still trying)' : '');
    }
    await sleep(document.hidden ? POLL_MS * 3 : POLL_MS);
  }
}

for (const button of document.querySelectorAll('.provider-choice')) {
  button.addEventListener('click', () => start(button.dataset.provider));
}

$('retry-btn').addEventListener('click', () => {
  const provider = current && current.provider;
  if (provider) {
    start(provider);
  } else {
    history.replaceState(null, '', '/dashboard/remote-cli/auth');
    $('flow').hidden = true;
    $('chooser').hidden = false;
  }
});

$('cancel-btn').addEventListener('click', async () => {
  $('cancel-btn').disabled = true;
  try {
    await api('DELETE', '/api/v1/auth-sessions/' + encodeURIComponent(sessionId));
  } catch (err) {
    $('flow-message').textContent = err.message;
  } finally {
    $('cancel-btn').disabled = false;
  }
});

if (sessionId) {
  follow();
} else if (app.dataset.preselect) {
  const chosen = document.querySelector(`.provider-choice[data-provider="${app.dataset.preselect}"]`);
  if (chosen) chosen.focus();
}
