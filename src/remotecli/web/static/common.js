// Shared by every dashboard page: the API helper (session cookie + CSRF header),
// confirmations for destructive forms, and busy states for buttons.

export function csrfToken() {
  const meta = document.querySelector('meta[name="csrf-token"]');
  return meta ? meta.content : '';
}

export class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

// fetch() a JSON endpoint of this controller; throws ApiError with the server's words.
export async function api(method, path, body) {
  const headers = { Accept: 'application/json' };
  if (method !== 'GET') headers['X-CSRF-Token'] = csrfToken();
  if (body !== undefined) headers['Content-Type'] = 'application/json';
  let response;
  try {
    response = await fetch(path, {
      method, headers, credentials: 'same-origin', cache: 'no-store',
      body: body === undefined ? undefined : JSON.stringify(body),
    });
  } catch (err) {
    throw new ApiError(0, 'network', 'The controller cannot be reached. Check your connection; retrying.');
  }
  let data = null;
  try { data = await response.json(); } catch (err) { data = null; }
  if (response.status === 401) {
    window.location.assign('/login?next=' + encodeURIComponent(location.pathname + location.search));
    throw new ApiError(401, 'authentication_required', 'Your dashboard session has ended; sign in again.');
  }
  if (!response.ok) {
    throw new ApiError(response.status, data && data.code || 'http_' + response.status,
      data && data.message || 'The controller answered ' + response.status + '.');
  }
  return { status: response.status, data };
}

export function sleep(ms) { return new Promise((resolve) => setTimeout(resolve, ms)); }

function markBusy(form) {
  const button = form.querySelector('button[data-busy]');
  if (button) {
    button.classList.add('is-busy');
    button.textContent = button.dataset.busy;
    // Disable after the submit has been taken, so the button's value still goes with it.
    setTimeout(() => { button.disabled = true; }, 0);
  }
}

document.addEventListener('submit', (event) => {
  const form = event.target;
  if (!(form instanceof HTMLFormElement) || form.method === 'dialog') return;
  const question = form.dataset.confirm;
  const dialog = document.getElementById('confirm-dialog');
  if (question && dialog && typeof dialog.showModal === 'function' && form.dataset.confirmed !== 'yes') {
    event.preventDefault();
    dialog.querySelector('.confirm-text').textContent = question;
    // The buttons say what happens (default: remove / keep); a form may name them.
    const yes = dialog.querySelector('.confirm-yes');
    const no = dialog.querySelector('.confirm-no');
    if (yes) {
      yes.dataset.default = yes.dataset.default || yes.textContent;
      yes.textContent = form.dataset.confirmYes || yes.dataset.default;
      yes.classList.toggle('btn-danger', !form.dataset.confirmYes);
      yes.classList.toggle('btn-primary', Boolean(form.dataset.confirmYes));
    }
    if (no) {
      no.dataset.default = no.dataset.default || no.textContent;
      no.textContent = form.dataset.confirmNo || no.dataset.default;
    }
    dialog.returnValue = '';
    dialog.addEventListener('close', () => {
      if (dialog.returnValue === 'yes') {
        form.dataset.confirmed = 'yes';
        const confirmed = document.createElement('input');
        confirmed.type = 'hidden';
        confirmed.name = 'confirm';
        confirmed.value = 'yes';
        form.appendChild(confirmed);
        markBusy(form);
        form.submit();
      }
    }, { once: true });
    dialog.showModal();
    return;
  }
  markBusy(form);
});
