// A real, local OpenID Connect provider (panva/oidc-provider 9.13) for remotecli's OAuth tests.
//
//   node idp.mjs --port P [--issuer URL] --password PW
//                [--planted-access-token X] [--planted-refresh-token Y] [--dashboard-redirect-uri URI ...]
//
// Listens on 127.0.0.1 only. Prints one JSON line {"event": "listening", ...} on stdout when ready.
// Accounts: any user name ([A-Za-z0-9._-]{1,64}) with the given password; email <name>@example.test.
// Clients (native, loopback redirects: oidc-provider 9 ignores the port of a loopback redirect URI
// for application_type "native", RFC 8252 section 7.3, so the registered URIs carry no port):
//   remotecli-claude-code  public (PKCE)   http://localhost/callback, http://127.0.0.1/callback
//   remotecli-codex        public (PKCE)   http://localhost/auth/callback
//   remotecli-gemini       secret + PKCE   http://127.0.0.1/oauth2callback (secret: remotecli-gemini-test-secret)
//   remotecli-dashboard    web, secret (client_secret_basic) + PKCE: the dashboard's single sign-on; its
//                          redirect URIs (exact, with port) come from --dashboard-redirect-uri (repeatable;
//                          default http://127.0.0.1/auth/oidc/callback). Secret: remotecli-dashboard-test-secret
// Every grant issues a refresh token; id_tokens carry `email`.
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
import http from 'node:http';
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
  },
});
if (!args.password) {
  console.error('idp: --password is required');
  process.exit(2);
}
const PASSWORD = args.password;
const HOST = '127.0.0.1';

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
];

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
      AccessToken: (_ctx, _token, client) => (client && client.clientId === 'remotecli-claude-code' ? 28800 : 3600),
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
      return this.clientId === 'remotecli-gemini' ? `ya29.${id}` : id;
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

  server.on('request', (req, res) => {
    const url = new URL(req.url, issuer);
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
  });

  const stop = () => server.close(() => process.exit(0));
  process.on('SIGTERM', stop);
  process.on('SIGINT', stop);
  console.log(JSON.stringify({
    event: 'listening', host: HOST, port, issuer, clients: CLIENTS.map((c) => c.client_id),
  }));
}

main().catch((err) => {
  console.error(`idp: ${err.stack || err}`);
  process.exit(1);
});
