// Dashboard: Codex's device-code sign-in, browserless. Starts POST /api/v1/device-signins and
// polls GET /api/v1/device-signins/{id}: shows the one-time code and the link the CLI printed,
// then the end in words (signed in / failed / expired). The CLI writes its own credentials.
import { api, sleep } from '/static/common.js';

const box = document.getElementById('device-signin');
const POLL_MS = 1500;

function show(state) {
  const status = box.querySelector('.device-status');
  const code = box.querySelector('.device-code');
  const link = box.querySelector('.device-link');
  status.textContent = state.message;
  status.dataset.status = state.status;
  if (state.user_code && state.status === 'awaiting_user') {
    code.textContent = state.user_code;
    link.textContent = state.verification_uri;
    link.href = state.verification_uri;
    box.querySelector('.device-prompt').hidden = false;
  } else {
    box.querySelector('.device-prompt').hidden = true;
  }
}

async function follow(id) {
  for (;;) {
    let state;
    try {
      state = await api('GET', `/api/v1/device-signins/${encodeURIComponent(id)}`);
    } catch (err) {
      box.querySelector('.device-status').textContent = err.message;
      await sleep(POLL_MS);
      continue;
    }
    show(state);
    if (['signed_in', 'failed', 'expired'].includes(state.status)) return state;
    await sleep(POLL_MS);
  }
}

if (box) {
  const button = box.querySelector('button.device-start');
  button.addEventListener('click', async () => {
    button.disabled = true;
    try {
      const started = await api('POST', '/api/v1/device-signins', { provider: box.dataset.provider });
      show(started);
      await follow(started.id);
    } catch (err) {
      box.querySelector('.device-status').textContent = err.message;
    } finally {
      button.disabled = false;
    }
  });
}
