// A real, local OpenID Connect provider (panva/oidc-provider 9.13) for remotecli's OAuth tests.
//
//   node idp.mjs --port P [--issuer URL] --password PW
//                [--planted-access-token X] [--planted-refresh-token Y] [--dashboard-redirect-uri URI ...]
//                [--tls-port P --tls-cert PEM --tls-key PEM]
//
// Listens on 127.0.0.1 only. With --tls-*, the same endpoints are also served over HTTPS on a second
// port (a certificate for the real providers' hosts, from a test CA), for tests that redirect a real
// CLI's own endpoints inside a guest (tests/support/guest_redirect.py); the real providers' token
// paths are aliases there: /v1/oauth/token (Anthropic), /oauth/token (OpenAI), /token (Google). Prints one JSON line {"event": "listening", ...} on stdout when ready.
// Accounts: any user name ([A-Za-z0-9._-]{1,64}) with the given password; email <name>@example.test.
// Clients (native, loopback redirects: oidc-provider 9 ignores the port of a loopback redirect URI
// for application_type "native", RFC 8252 section 7.3, so the registered URIs carry no port):
//   remotecli-claude-code  public (PKCE)   http://localhost/callback, http://127.0.0.1/callback
//   remotecli-codex        public (PKCE)   http://localhost/auth/callback
//   remotecli-gemini       secret + PKCE   http://127.0.0.1/oauth2callback (secret: remotecli-gemini-test-secret)
//   remotecli-dashboard    web, secret (client_secret_basic) + PKCE: the dashboard's single sign-on; its
//                          redirect URIs (exact, with port) come from --dashboard-redirect-uri (repeatable;
//                          default http://127.0.0.1/auth/oidc/callback). Secret: remotecli-dashboard-test-secret
// The same clients under the real CLIs' own client ids (Claude Code, Codex, Gemini CLI with its published
// installed-app secret), so a real CLI can refresh, and sign Codex in by device code, against this IdP.
// Every grant issues a refresh token; id_tokens carry `email`. Refresh tokens rotate on use, except
// the Gemini clients' (Google keeps a refresh token). Every token grant is logged as a JSON line
// {"event": "grant", grant_type, client_id, host, path, tls, refresh_token_sha256} (a digest prefix,
// never a token), and every refused one as {"event": "grant_error", ...}.
// Codex's device-code sign-in (codex-rs login/device_code_auth): POST /api/accounts/deviceauth/usercode
// {client_id} -> {device_auth_id, user_code, interval}; POST /api/accounts/deviceauth/token
// {device_auth_id, user_code} -> 403 while pending, then {authorization_code, code_challenge,
// code_verifier} (a real authorization code for redirect_uri <issuer>/deviceauth/callback, issuer as
// the CLI sees it, i.e. the Host it called); GET /codex/device is the page a user opens;
// POST /codex/device {user_code, username, password[, decision=deny]} approves (or denies) a code.
// Google's /tokeninfo (GET ?access_token=, or POST as google-auth-library sends it) answers for this
// IdP's access tokens.
// Strict like the real providers: every authorization request needs `state` and PKCE with
// code_challenge_method=S256 (anything else is refused with a 400 page), redirect URIs must be
// registered (host and path; the loopback port is free, RFC 8252) and the token request must
// repeat the authorization's redirect_uri.
// Answers shaped like the real providers':
//   - the token endpoint also accepts a JSON body (as Anthropic's does): it is re-posted
//     form-encoded; a JSON authorization_code request must send back the authorization's `state`
//     (Claude Code does, Anthropic checks it), and the answer is Anthropic's, with
//     `account` {uuid, email_address} and `organization` {uuid, name} objects; the Claude client's
//     access tokens last 28800 s (expires_in 28800), as Anthropic's do;
//   - OpenAI: the id_token carries the `https://api.openai.com/auth` claims (chatgpt_account_id,
//     chatgpt_plan_type, chatgpt_user_id);
//   - Google: the Gemini client's access tokens look like Google's (`ya29.` prefix), with an
//     id_token.
// Interaction pages are our own and keyboard-drivable: the login form autofocuses the user name
// (Tab to the password, Enter submits); the consent page autofocuses "Allow" (Enter allows),
// "Deny" ends in a redirect to the client with error=access_denied.

import crypto from 'node:crypto';
import fs from 'node:fs';
import http from 'node:http';
import https from 'node:https';
import { parseArgs } from 'node:util';

import Provider from 'oidc-provider';

const { values: args } = parseArgs({
  options: {
    port: { type: 'string', default: '0' },
    issuer: { type: 'string' },
    password: { type: 'string' },
    'planted-access-token': { type: 'string' },
    'planted-refresh-token': { type: 'string' },
    'dashboard-redirect-uri': { type: 'string', multiple: true },
    'tls-port': { type: 'string' },
    'tls-cert': { type: 'string' },
    'tls-key': { type: 'string' },
  },
});
if (!args.password) {
  console.error('idp: --password is required');
  process.exit(2);
}
const PASSWORD = args.password;
const HOST = '127.0.0.1';

const REAL_CLAUDE_CLIENT_ID = '9d1c250a-e61b-44d9-88ed-5944d1962f5e';
const REAL_CODEX_CLIENT_ID = 'app_EMoamEEZ73f0CkXaXp7hrann';
const REAL_GEMINI_CLIENT_ID = '681255809395-oo8ft2oprdrnp9e3aqf6av3hmdib135j.apps.googleusercontent.com';
const REAL_GEMINI_CLIENT_SECRET = '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';

export const CLIENTS = [
  {
    client_id: 'remotecli-claude-code',
    application_type: 'native',
    token_endpoint_auth_method: 'none',
    grant_types: ['authorization_code', 'refresh_token'],
    response_types: ['code'],
    redirect_uris: ['http://localhost/callback', 'http://127.0.0.1/callback'],
  },
  {
    client_id: 'remotecli-codex',
    application_type: 'native',
    token_endpoint_auth_method: 'none',
    grant_types: ['authorization_code', 'refresh_token'],
    response_types: ['code'],
    redirect_uris: ['http://localhost/auth/callback', 'http://127.0.0.1/auth/callback'],
  },
  {
    client_id: 'remotecli-gemini',
    client_secret: 'remotecli-gemini-test-secret',
    application_type: 'native',
    token_endpoint_auth_method: 'client_secret_post',
    grant_types: ['authorization_code', 'refresh_token'],
    response_types: ['code'],
    redirect_uris: ['http://127.0.0.1/oauth2callback', 'http://localhost/oauth2callback'],
  },
  {
    client_id: 'remotecli-dashboard',
    client_secret: 'remotecli-dashboard-test-secret',
    application_type: 'web',
    token_endpoint_auth_method: 'client_secret_basic',
    grant_types: ['authorization_code'],
    response_types: ['code'],
    redirect_uris: args['dashboard-redirect-uri'] || ['http://127.0.0.1/auth/oidc/callback'],
  },
  // The real CLIs' own client ids (their refresh and device-code requests carry these).
  {
    client_id: REAL_CLAUDE_CLIENT_ID,
    application_type: 'native',
    token_endpoint_auth_method: 'none',
    grant_types: ['authorization_code', 'refresh_token'],
    response_types: ['code'],
    redirect_uris: ['http://localhost/callback', 'https://platform.claude.com/oauth/code/callback'],
  },
  {
    client_id: REAL_CODEX_CLIENT_ID,
    application_type: 'native',
    token_endpoint_auth_method: 'none',
    grant_types: ['authorization_code', 'refresh_token'],
    response_types: ['code'],
    redirect_uris: ['http://localhost/auth/callback', 'https://auth.openai.com/deviceauth/callback'],
  },
  {
    client_id: REAL_GEMINI_CLIENT_ID,
    client_secret: REAL_GEMINI_CLIENT_SECRET,
    application_type: 'native',
    token_endpoint_auth_method: 'client_secret_post',
    grant_types: ['authorization_code', 'refresh_token'],
    response_types: ['code'],
    redirect_uris: ['http://127.0.0.1/oauth2callback', 'http://localhost/oauth2callback'],
  },
];
const CLAUDE_CLIENTS = new Set(['remotecli-claude-code', REAL_CLAUDE_CLIENT_ID]);
const GEMINI_CLIENTS = new Set(['remotecli-gemini', REAL_GEMINI_CLIENT_ID]);

// The real providers' scopes, so profiles can be tested with their own scope lists.
const PROVIDER_SCOPES = [
  'org:create_api_key',
  'user:profile',
  'user:inference',
  'user:sessions:claude_code',
  'user:mcp_servers',
  'user:file_upload',
  'user:plugins',
  'user:privacy_consents:write',
  'api.connectors.read',
  'api.connectors.invoke',
  'https://www.googleapis.com/auth/cloud-platform',
  'https://www.googleapis.com/auth/userinfo.email',
  'https://www.googleapis.com/auth/userinfo.profile',
];

const USERNAME = /^[A-Za-z0-9._-]{1,64}$/;

function escapeHtml(value) {
  return String(value).replace(/[&<>"']/g, (c) => `&#${c.charCodeAt(0)};`);
}

function page(title, body) {
  return `<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>${escapeHtml(title)}</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
body { font-family: sans-serif; background: #f3f4f6; margin: 0; }
main { max-width: 420px; margin: 80px auto; background: #fff; padding: 32px; border-radius: 8px; }
label { display: block; margin-top: 12px; } input { width: 100%; padding: 8px; box-sizing: border-box; }
button { margin-top: 16px; padding: 8px 16px; font-size: 16px; }
</style></head><body><main>${body}</main></body></html>`;
}

function send(res, status, html) {
  res.writeHead(status, {
    'content-type': 'text/html; charset=utf-8',
    'cache-control': 'no-store',
    'content-length': Buffer.byteLength(html),
  });
  res.end(html);
}

function readBody(req, limit = 64 * 1024) {
  return new Promise((resolve, reject) => {
    const chunks = [];
    let size = 0;
    req.on('data', (chunk) => {
      size += chunk.length;
      if (size > limit) {
        reject(new Error('body too large'));
        req.destroy();
        return;
      }
      chunks.push(chunk);
    });
    req.on('end', () => resolve(Buffer.concat(chunks)));
    req.on('error', reject);
  });
}

function loginPage(uid, clientId, error) {
  const note = error ? `<p role="alert" style="color:#b91c1c">${escapeHtml(error)}</p>` : '';
  return page('Sign in - remotecli test IdP', `
<h1>Sign in</h1><p>to continue to <b>${escapeHtml(clientId)}</b></p>${note}
<form method="post" action="/interaction/${escapeHtml(uid)}/login" autocomplete="off">
<label>User name <input id="username" name="username" autofocus required></label>
<label>Password <input id="password" name="password" type="password" required></label>
<button type="submit">Sign in</button>
</form>`);
}

function consentPage(uid, clientId, scopes) {
  return page('Authorize - remotecli test IdP', `
<h1>Authorize ${escapeHtml(clientId)}</h1>
<p>It asks for: ${escapeHtml(scopes.join(' ') || '(nothing new)')}</p>
<form method="post" action="/interaction/${escapeHtml(uid)}/confirm">
<button id="allow" type="submit" name="decision" value="allow" autofocus>Allow</button>
<button id="deny" type="submit" name="decision" value="deny">Deny</button>
</form>`);
}

async function main() {
  const server = http.createServer();
  await new Promise((resolve, reject) => {
    server.once('error', reject);
    server.listen(Number(args.port), HOST, resolve);
  });
  const { port } = server.address();
  const issuer = args.issuer || `http://${HOST}:${port}`;

  const { privateKey } = crypto.generateKeyPairSync('rsa', { modulusLength: 2048 });
  const jwk = { ...privateKey.export({ format: 'jwk' }), use: 'sig', alg: 'RS256', kid: 'idp-test-key' };

  const provider = new Provider(issuer, {
    clients: CLIENTS,
    jwks: { keys: [jwk] },
    cookies: { keys: [crypto.randomBytes(32).toString('base64url')] },
    scopes: ['openid', 'offline_access', 'email', 'profile', ...PROVIDER_SCOPES],
    claims: {
      openid: ['sub', 'https://api.openai.com/auth'],
      email: ['email', 'email_verified'],
      profile: ['name', 'preferred_username'],
    },
    // Put the scope's claims (email) in the id_token even though an access token is issued.
    conformIdTokenClaims: false,
    features: {
      devInteractions: { enabled: false },
      revocation: { enabled: true },
    },
    pkce: { required: () => true },
    issueRefreshToken: async (_ctx, client) => client.grantTypeAllowed('refresh_token'),
    // Anthropic and OpenAI rotate refresh tokens on use; Google keeps them.
    rotateRefreshToken: (ctx) => !GEMINI_CLIENTS.has(ctx.oidc.client.clientId),
    interactions: { url: async (_ctx, interaction) => `/interaction/${interaction.uid}` },
    async findAccount(_ctx, sub) {
      return {
        accountId: sub,
        async claims() {
          return {
            sub,
            email: `${sub}@example.test`,
            email_verified: true,
            name: sub,
            preferred_username: sub,
            'https://api.openai.com/auth': {
              chatgpt_account_id: `acct-${sub}`,
              chatgpt_plan_type: 'plus',
              chatgpt_user_id: `user-${sub}`,
              user_id: `user-${sub}`,
            },
          };
        },
      };
    },
    ttl: {
      AccessToken: (_ctx, _token, client) => (client && CLAUDE_CLIENTS.has(client.clientId) ? 28800 : 3600),
      AuthorizationCode: 120,
      IdToken: 3600,
      RefreshToken: 14 * 24 * 3600,
      Interaction: 3600,
      Session: 3600,
      Grant: 14 * 24 * 3600,
    },
    renderError: async (ctx, out) => {
      ctx.type = 'html';
      ctx.body = page('Error - remotecli test IdP',
        `<h1>Error</h1><p id="error">${escapeHtml(out.error)}: ${escapeHtml(out.error_description || '')}</p>`);
    },
  });
  provider.proxy = false;
  provider.on('server_error', (_ctx, err) => console.error(`idp: server_error: ${err.stack || err}`));
  function grantRecord(event, ctx, extra) {
    const params = ctx.oidc.params || {};
    const rt = params.refresh_token ? crypto.createHash('sha256').update(String(params.refresh_token)).digest('hex').slice(0, 16) : null;
    console.log(JSON.stringify({
      event,
      grant_type: params.grant_type || null,
      client_id: ctx.oidc.client ? ctx.oidc.client.clientId : (params.client_id || null),
      host: ctx.req.headers['x-idp-original-host'] || ctx.get('host'),
      path: ctx.req.headers['x-idp-original-path'] || ctx.path,
      tls: ctx.req.headers['x-idp-tls'] === '1',
      refresh_token_sha256: rt,
      ...extra,
    }));
  }
  provider.on('grant.success', (ctx) => grantRecord('grant', ctx, {}));
  provider.on('grant.error', (ctx, err) => grantRecord('grant_error', ctx, { error: err.error || err.name, detail: err.error_description || '' }));

  // Planted token values (for leak tests): every issued access / refresh token gets that value.
  const plantedAt = args['planted-access-token'];
  const plantedRt = args['planted-refresh-token'];
  // The original still runs: it also sets the token's format.
  function plant(Model, value) {
    const original = Model.prototype.generateTokenId;
    Model.prototype.generateTokenId = function generateTokenId(...rest) {
      original.apply(this, rest);
      return value;
    };
  }
  if (plantedAt) plant(provider.AccessToken, plantedAt);
  if (plantedRt) plant(provider.RefreshToken, plantedRt);
  if (!plantedAt) {
    // Google's access tokens start with "ya29.".
    const original = provider.AccessToken.prototype.generateTokenId;
    provider.AccessToken.prototype.generateTokenId = function generateTokenId(...rest) {
      const id = original.apply(this, rest);
      return GEMINI_CLIENTS.has(this.clientId) ? `ya29.${id}` : id;
    };
  }

  // The `state` each authorization code was issued with (seen in the redirect to the client).
  const codeStates = new Map();
  function watchRedirects(res) {
    const setHeader = res.setHeader.bind(res);
    res.setHeader = (name, value) => {
      if (String(name).toLowerCase() === 'location') {
        try {
          const target = new URL(String(value));
          const code = target.searchParams.get('code');
          if (code) codeStates.set(code, target.searchParams.get('state'));
        } catch {
          // a relative redirect inside the IdP
        }
      }
      return setHeader(name, value);
    };
  }

  function refuse(res, status, error, description) {
    const body = JSON.stringify({ error, error_description: description });
    res.writeHead(status, { 'content-type': 'application/json', 'content-length': Buffer.byteLength(body) });
    res.end(body);
  }

  // Anthropic's token answer: the account and organization of the grant. (Anthropic sends no
  // id_token; one is kept here when `openid` was asked for, which tests of the OAuth agent use.)
  async function anthropicShape(doc) {
    const token = doc.access_token ? await provider.AccessToken.find(doc.access_token) : undefined;
    const sub = token ? token.accountId : 'unknown';
    doc.account = { uuid: `account-${sub}`, email_address: `${sub}@example.test` };
    doc.organization = { uuid: `org-${sub}`, name: `${sub}'s Organization` };
    return doc;
  }

  const oidc = provider.callback();

  async function interaction(req, res, uid, action) {
    const details = await provider.interactionDetails(req, res);
    if (details.uid !== uid) {
      send(res, 400, page('Error', '<h1>Interaction mismatch</h1>'));
      return;
    }
    const { prompt, params } = details;
    if (req.method === 'GET' && !action) {
      if (prompt.name === 'login') {
        send(res, 200, loginPage(uid, params.client_id));
      } else {
        const scopes = [
          ...(prompt.details.missingOIDCScope || []),
          ...Object.values(prompt.details.missingResourceScopes || {}).flat(),
        ];
        send(res, 200, consentPage(uid, params.client_id, scopes));
      }
      return;
    }
    if (req.method !== 'POST') {
      send(res, 405, page('Error', '<h1>Method not allowed</h1>'));
      return;
    }
    const form = new URLSearchParams((await readBody(req)).toString('utf8'));
    if (action === 'login' && prompt.name === 'login') {
      const username = form.get('username') || '';
      const password = form.get('password') || '';
      const ok = USERNAME.test(username)
        && crypto.timingSafeEqual(
          crypto.createHash('sha256').update(password).digest(),
          crypto.createHash('sha256').update(PASSWORD).digest(),
        );
      if (!ok) {
        send(res, 200, loginPage(uid, params.client_id, 'Wrong user name or password.'));
        return;
      }
      await provider.interactionFinished(req, res, { login: { accountId: username } },
        { mergeWithLastSubmission: false });
      return;
    }
    if (action === 'confirm' && prompt.name === 'consent') {
      if (form.get('decision') !== 'allow') {
        await provider.interactionFinished(req, res, {
          error: 'access_denied',
          error_description: 'The user denied the request.',
        }, { mergeWithLastSubmission: false });
        return;
      }
      const grant = details.grantId
        ? await provider.Grant.find(details.grantId)
        : new provider.Grant({ accountId: details.session.accountId, clientId: params.client_id });
      if (prompt.details.missingOIDCScope) grant.addOIDCScope(prompt.details.missingOIDCScope.join(' '));
      if (prompt.details.missingOIDCClaims) grant.addOIDCClaims(prompt.details.missingOIDCClaims);
      for (const [indicator, scopes] of Object.entries(prompt.details.missingResourceScopes || {})) {
        grant.addResourceScope(indicator, scopes.join(' '));
      }
      const grantId = await grant.save();
      const consent = details.grantId ? {} : { grantId };
      await provider.interactionFinished(req, res, { consent }, { mergeWithLastSubmission: true });
      return;
    }
    send(res, 400, page('Error', '<h1>Unexpected step</h1>'));
  }

  // JSON token requests (Anthropic style) are re-posted to ourselves form-encoded.
  async function jsonToken(req, res) {
    let doc;
    try {
      doc = JSON.parse((await readBody(req)).toString('utf8'));
    } catch {
      res.writeHead(400, { 'content-type': 'application/json' });
      res.end(JSON.stringify({ error: 'invalid_request', error_description: 'bad JSON body' }));
      return;
    }
    if (doc && doc.grant_type === 'authorization_code') {
      const expected = codeStates.get(String(doc.code));
      if (!doc.state || expected === undefined || expected !== doc.state) {
        refuse(res, 400, 'invalid_grant', 'state does not match the authorization request');
        return;
      }
      codeStates.delete(String(doc.code));
    }
    const form = new URLSearchParams();
    for (const [key, value] of Object.entries(doc || {})) {
      if (key === 'state') continue; // ours to check (above), not part of RFC 6749's token request
      if (value !== null && value !== undefined) form.set(key, String(value));
    }
    const body = form.toString();
    const headers = { 'content-type': 'application/x-www-form-urlencoded', 'content-length': Buffer.byteLength(body) };
    if (req.headers.authorization) headers.authorization = req.headers.authorization;
    for (const name of ['x-idp-original-host', 'x-idp-original-path', 'x-idp-tls']) {
      if (req.headers[name]) headers[name] = req.headers[name];
    }
    const inner = http.request({ host: HOST, port, method: 'POST', path: req.url, headers }, (answer) => {
      const chunks = [];
      answer.on('data', (chunk) => chunks.push(chunk));
      answer.on('end', async () => {
        let out = Buffer.concat(chunks);
        const outHeaders = { ...answer.headers };
        delete outHeaders['transfer-encoding'];
        if (answer.statusCode === 200) {
          try {
            out = Buffer.from(JSON.stringify(await anthropicShape(JSON.parse(out.toString('utf8')))));
            outHeaders['content-length'] = String(out.length);
          } catch (err) {
            console.error(`idp: could not shape the JSON token answer: ${err.message}`);
          }
        }
        res.writeHead(answer.statusCode, outHeaders);
        res.end(out);
      });
    });
    inner.on('error', () => {
      res.writeHead(502);
      res.end();
    });
    inner.end(body);
  }

  // Codex's device-code sign-in: device_auth_id -> {user_code, client_id, base, approved, code}.
  const deviceCodes = new Map();
  const USER_CODE_ALPHABET = 'ABCDEFGHJKLMNPQRSTUVWXYZ23456789';

  function sendJson(res, status, doc) {
    const body = JSON.stringify(doc);
    res.writeHead(status, { 'content-type': 'application/json', 'cache-control': 'no-store', 'content-length': Buffer.byteLength(body) });
    res.end(body);
  }

  async function readJson(req) {
    try {
      const doc = JSON.parse((await readBody(req)).toString('utf8'));
      return doc && typeof doc === 'object' ? doc : null;
    } catch {
      return null;
    }
  }

  async function deviceUserCode(req, res, base) {
    const doc = await readJson(req);
    const clientId = doc && String(doc.client_id || '');
    const client = clientId ? await provider.Client.find(clientId) : undefined;
    if (!client) {
      sendJson(res, 400, { error: 'invalid_client', error_description: 'unknown client_id' });
      return;
    }
    const deviceAuthId = `deviceauth_${crypto.randomBytes(12).toString('hex')}`;
    const pick = () => Array.from(crypto.randomBytes(4), (b) => USER_CODE_ALPHABET[b % USER_CODE_ALPHABET.length]).join('');
    const userCode = `${pick()}-${pick()}`;
    deviceCodes.set(deviceAuthId, { userCode, clientId, base, state: 'pending', answer: null, expiresAt: Date.now() + 15 * 60 * 1000 });
    console.log(JSON.stringify({ event: 'device_code', client_id: clientId, host: req.headers['x-idp-original-host'], user_code: userCode }));
    sendJson(res, 200, { device_auth_id: deviceAuthId, user_code: userCode, interval: '1' });
  }

  async function deviceToken(req, res) {
    const doc = await readJson(req);
    const entry = doc ? deviceCodes.get(String(doc.device_auth_id || '')) : undefined;
    if (!entry || entry.userCode !== String(doc.user_code || '')) {
      sendJson(res, 404, { error: 'not_found' });
      return;
    }
    if (Date.now() > entry.expiresAt) {
      sendJson(res, 410, { error: 'expired_token' });
      return;
    }
    if (entry.state === 'denied') {
      sendJson(res, 400, { error: 'access_denied' });
      return;
    }
    if (entry.state !== 'approved' || !entry.answer) {
      sendJson(res, 403, { error: 'authorization_pending' }); // Codex keeps polling on 403/404
      return;
    }
    const answer = entry.answer;
    deviceCodes.delete(String(doc.device_auth_id));
    console.log(JSON.stringify({ event: 'device_code_redeemed', client_id: entry.clientId }));
    sendJson(res, 200, answer);
  }

  // Approving a user code: a real authorization code (with its own PKCE pair, as OpenAI's
  // device flow hands the CLI) for redirect_uri <base>/deviceauth/callback.
  async function deviceApprove(entry, accountId) {
    const codeVerifier = crypto.randomBytes(32).toString('base64url');
    const codeChallenge = crypto.createHash('sha256').update(codeVerifier).digest('base64url');
    const scope = 'openid profile email offline_access';
    const grant = new provider.Grant({ accountId, clientId: entry.clientId });
    grant.addOIDCScope(scope);
    const grantId = await grant.save();
    const code = new provider.AuthorizationCode({
      accountId,
      clientId: entry.clientId,
      grantId,
      redirectUri: `${entry.base}/deviceauth/callback`,
      scope,
      codeChallenge,
      codeChallengeMethod: 'S256',
      authTime: Math.floor(Date.now() / 1000),
    });
    const authorizationCode = await code.save();
    entry.answer = { authorization_code: authorizationCode, code_challenge: codeChallenge, code_verifier: codeVerifier };
    entry.state = 'approved';
  }

  function devicePage(error) {
    const note = error ? `<p role="alert" style="color:#b91c1c">${escapeHtml(error)}</p>` : '';
    return page('Device sign-in - remotecli test IdP', `
<h1>Enter your one-time code</h1>${note}
<form method="post" action="/codex/device" autocomplete="off">
<label>Code <input id="user_code" name="user_code" autofocus required></label>
<label>User name <input id="username" name="username" required></label>
<label>Password <input id="password" name="password" type="password" required></label>
<button type="submit" name="decision" value="allow">Continue</button>
<button type="submit" name="decision" value="deny">Deny</button>
</form>`);
  }

  async function deviceVerify(req, res) {
    if (req.method === 'GET') {
      send(res, 200, devicePage());
      return;
    }
    const form = new URLSearchParams((await readBody(req)).toString('utf8'));
    const userCode = (form.get('user_code') || '').trim().toUpperCase();
    const username = form.get('username') || '';
    const password = form.get('password') || '';
    const found = [...deviceCodes.values()].find((e) => e.userCode === userCode && e.state === 'pending');
    const ok = USERNAME.test(username)
      && crypto.timingSafeEqual(
        crypto.createHash('sha256').update(password).digest(),
        crypto.createHash('sha256').update(PASSWORD).digest(),
      );
    if (!found || Date.now() > found.expiresAt) {
      send(res, 400, devicePage('That code is not valid or has expired.'));
      return;
    }
    if (!ok) {
      send(res, 401, devicePage('Wrong user name or password.'));
      return;
    }
    if (form.get('decision') === 'deny') {
      found.state = 'denied';
      console.log(JSON.stringify({ event: 'device_code_denied', user_code: userCode }));
      send(res, 200, page('Denied', '<h1 id="result">Denied</h1>'));
      return;
    }
    await deviceApprove(found, username);
    console.log(JSON.stringify({ event: 'device_code_approved', user_code: userCode, account: username }));
    send(res, 200, page('Approved', '<h1 id="result">Signed in. You may close this page.</h1>'));
  }

  // Google's tokeninfo for this IdP's access tokens.
  async function tokenInfo(req, res, url) {
    // google-auth-library POSTs the token form-encoded (and as a Bearer header); GET ?access_token= too.
    let value = url.searchParams.get('access_token') || '';
    if (!value && req.method === 'POST') value = new URLSearchParams((await readBody(req)).toString('utf8')).get('access_token') || '';
    if (!value && /^Bearer /i.test(req.headers.authorization || '')) value = req.headers.authorization.slice(7).trim();
    const token = value ? await provider.AccessToken.find(value) : undefined;
    if (!token) {
      sendJson(res, 400, { error: 'invalid_token', error_description: 'Invalid Value' });
      return;
    }
    const now = Math.floor(Date.now() / 1000);
    sendJson(res, 200, {
      azp: token.clientId, aud: token.clientId, sub: token.accountId, scope: token.scope,
      exp: String(token.exp), expires_in: String(token.exp - now),
      email: `${token.accountId}@example.test`, email_verified: 'true', access_type: 'offline',
    });
  }

  function route(req, res) {
    // Where the request was aimed (kept through the JSON re-post), for the grant log.
    if (!req.headers['x-idp-original-host']) {
      req.headers['x-idp-original-host'] = String(req.headers.host || '');
      req.headers['x-idp-original-path'] = String(req.url || '').split('?')[0];
      req.headers['x-idp-tls'] = req.socket.encrypted ? '1' : '0';
    }
    const first = new URL(req.url, issuer);
    // The real providers' token paths.
    if (first.pathname === '/v1/oauth/token' || first.pathname === '/oauth/token') {
      req.url = `/token${first.search}`;
    }
    const url = new URL(req.url, issuer);
    const base = req.headers['x-idp-tls'] === '1' ? `https://${req.headers['x-idp-original-host']}` : issuer;
    const fail = (err) => {
      console.error(`idp: ${err.stack || err}`);
      if (!res.headersSent) sendJson(res, 500, { error: 'server_error' });
    };
    if (url.pathname === '/api/accounts/deviceauth/usercode' && req.method === 'POST') {
      deviceUserCode(req, res, base).catch(fail);
      return;
    }
    if (url.pathname === '/api/accounts/deviceauth/token' && req.method === 'POST') {
      deviceToken(req, res).catch(fail);
      return;
    }
    if (url.pathname === '/codex/device' && (req.method === 'GET' || req.method === 'POST')) {
      deviceVerify(req, res).catch(fail);
      return;
    }
    if (url.pathname === '/tokeninfo') {
      tokenInfo(req, res, url).catch(fail);
      return;
    }
    watchRedirects(res);
    if (url.pathname === '/auth' && req.method === 'GET') {
      const params = url.searchParams;
      let problem = null;
      if (!params.get('state')) problem = 'state is required';
      else if (!params.get('code_challenge')) problem = 'code_challenge is required (PKCE)';
      else if (params.get('code_challenge_method') !== 'S256') problem = 'code_challenge_method must be S256';
      if (problem) {
        send(res, 400, page('Error - remotecli test IdP', `<h1>Error</h1><p id="error">invalid_request: ${escapeHtml(problem)}</p>`));
        return;
      }
    }
    const match = /^\/interaction\/([A-Za-z0-9_-]+)(?:\/(login|confirm))?$/.exec(url.pathname);
    if (match) {
      interaction(req, res, match[1], match[2]).catch((err) => {
        console.error(`idp: interaction error: ${err.name}: ${err.message}`);
        if (!res.headersSent) send(res, 400, page('Error', `<h1>${escapeHtml(err.name)}</h1>`));
      });
      return;
    }
    if (url.pathname === '/token' && req.method === 'POST'
        && (req.headers['content-type'] || '').startsWith('application/json')) {
      jsonToken(req, res);
      return;
    }
    oidc(req, res);
  }
  server.on('request', route);

  let tlsPort = null;
  if (args['tls-port'] !== undefined) {
    const tlsServer = https.createServer({ cert: fs.readFileSync(args['tls-cert']), key: fs.readFileSync(args['tls-key']) });
    tlsServer.on('request', route);
    tlsServer.on('secureConnection', (socket) => {
      console.log(JSON.stringify({ event: 'tls_connection', servername: socket.servername || null }));
    });
    tlsServer.on('tlsClientError', (err, socket) => {
      console.log(JSON.stringify({ event: 'tls_error', servername: socket.servername || null, error: err.code || err.message }));
    });
    await new Promise((resolve, reject) => {
      tlsServer.once('error', reject);
      tlsServer.listen(Number(args['tls-port']), HOST, resolve);
    });
    tlsPort = tlsServer.address().port;
  }

  const stop = () => server.close(() => process.exit(0));
  process.on('SIGTERM', stop);
  process.on('SIGINT', stop);
  console.log(JSON.stringify({
    event: 'listening', host: HOST, port, tls_port: tlsPort, issuer, clients: CLIENTS.map((c) => c.client_id),
  }));
}

main().catch((err) => {
  console.error(`idp: ${err.stack || err}`);
  process.exit(1);
});
