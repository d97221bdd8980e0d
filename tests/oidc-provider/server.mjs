// Loopback OpenID Connect provider (oidc-provider) and a protected API for
// tower-auth-refresh integration tests. README.md holds the full contract.
//
//   node server.mjs <port>      (0 = pick a free port; the API always takes a free port)
//
// Writes, in one write, exactly two lines to stdout once both servers listen:
//   LISTENING http://127.0.0.1:<port>
//   API http://127.0.0.1:<api port>
// and nothing else, ever (readers drop the pipe after reading). Everything else
// goes to stderr. Exits when stdin closes, and on SIGTERM / SIGINT.
//
// Env:
//   ACCESS_TOKEN_TTL    access token lifetime in seconds (default 3600)
//   STRICT_CLIENT_AUTH  "1" (default): a client must authenticate with the
//                       method it is registered with. Stock oidc-provider
//                       accepts client_secret_basic and client_secret_post
//                       interchangeably; "0" restores that behaviour.
//   DPOP_TOKEN_NONCE    "1" (default): a DPoP proof at the token endpoint must
//                       carry a server nonce; "0" switches that off.
//   API_NONCE_EVERY     the API's DPoP nonce rotates every N accepted requests
//                       (default 50; 0 = never).
//   API_PAGES           pages of GET /contacts (default 1000).

import { createHash, randomBytes } from 'node:crypto';
import { createServer } from 'node:http';

// stdout carries only the two startup lines. oidc-provider prints its NOTICEs
// with console.info, so send every console method that targets stdout to
// stderr before the library is loaded (hence the dynamic imports below).
for (const method of ['log', 'info', 'debug', 'dir', 'table']) {
  console[method] = console.error;
}

const { default: Provider, errors } = await import('oidc-provider');
const { calculateJwkThumbprint, EmbeddedJWK, jwtVerify } = await import('jose');

function fail(message) {
  process.stderr.write(`oidc-provider fixture: ${message}\n`);
  process.exit(2);
}

function log(message) {
  process.stderr.write(`oidc-provider fixture: ${message}\n`);
}

const portArg = process.argv[2] ?? '0';
if (!/^\d+$/.test(portArg) || Number(portArg) > 65535) {
  fail(`invalid port argument: ${JSON.stringify(portArg)}`);
}

// A non-negative integer from the environment, or exit with a message.
function integerEnv(name, fallback, min) {
  const raw = process.env[name] ?? String(fallback);
  if (!/^\d+$/.test(raw) || Number(raw) < min || !Number.isSafeInteger(Number(raw))) {
    fail(`${name} must be an integer >= ${min}, got ${JSON.stringify(raw)}`);
  }
  return Number(raw);
}

function flagEnv(name) {
  const raw = process.env[name] ?? '1';
  if (raw !== '0' && raw !== '1') {
    fail(`${name} must be 0 or 1, got ${JSON.stringify(raw)}`);
  }
  return raw === '1';
}

const ACCESS_TOKEN_TTL = integerEnv('ACCESS_TOKEN_TTL', 3600, 1);
const STRICT_CLIENT_AUTH = flagEnv('STRICT_CLIENT_AUTH');
const DPOP_TOKEN_NONCE = flagEnv('DPOP_TOKEN_NONCE');
const API_NONCE_EVERY = integerEnv('API_NONCE_EVERY', 50, 0);
const API_PAGES = integerEnv('API_PAGES', 1000, 1);

const RESOURCE = 'urn:api';
const READ = 'contacts:read';
const WRITE = 'contacts:write';
// What a client_credentials request without `scope` gets.
const DEFAULT_SCOPE = READ;
const CLIENT_SCOPE = `${READ} ${WRITE}`;
const DPOP_ALGS = ['ES256'];
// A DPoP proof's iat may differ from the API's clock by this much.
const IAT_WINDOW_SECONDS = 60;
// Connections stay open longer than hyper-util's pool keeps them idle (90 s), so the client,
// never the server, closes an idle connection: a request never races a server-side close.
const KEEP_ALIVE_MS = 120_000;

const clients = [
  {
    client_id: 'batch-basic',
    // Special characters on purpose: with client_secret_basic the client
    // must application/x-www-form-urlencode id and secret before base64
    // (RFC 6749 section 2.3.1); oidc-provider decodes them that way.
    client_secret: 'b@tch s3cret/+&=',
    grant_types: ['client_credentials'],
    response_types: [],
    redirect_uris: [],
    token_endpoint_auth_method: 'client_secret_basic',
    scope: CLIENT_SCOPE,
  },
  {
    client_id: 'batch-post',
    client_secret: 'p0st-secret',
    grant_types: ['client_credentials'],
    response_types: [],
    redirect_uris: [],
    token_endpoint_auth_method: 'client_secret_post',
    scope: CLIENT_SCOPE,
  },
  {
    // Sender-constrained: a token request without a DPoP proof is refused,
    // and the token is bound to the proof key's thumbprint (jkt).
    client_id: 'batch-dpop',
    client_secret: 'dp0p-secret',
    grant_types: ['client_credentials'],
    response_types: [],
    redirect_uris: [],
    token_endpoint_auth_method: 'client_secret_post',
    scope: CLIENT_SCOPE,
    dpop_bound_access_tokens: true,
  },
];

// Signing keys: oidc-provider's built-in development keys. Generating an RSA key here and
// exporting it as a JWK can deadlock Node.js 20 (a garbage collection during the export runs
// the key-generation job's destructor, which takes the lock the export holds); the tokens
// this fixture issues are opaque, so nothing depends on the key.

const configuration = {
  clients,
  cookies: { keys: ['tower-auth-refresh-oidc-fixture-cookie-key'] },
  scopes: ['openid', 'offline_access', READ, WRITE],
  // The API accepts ES256 proofs only; the token endpoint (and discovery) says the same.
  enabledJWA: { dPoPSigningAlgValues: DPOP_ALGS },
  features: {
    devInteractions: { enabled: false },
    clientCredentials: { enabled: true },
    dPoP: {
      enabled: true,
      // oidc-provider derives its nonces from this secret and the time (60 s steps); any fixed
      // 32 bytes do for a test.
      nonceSecret: createHash('sha256').update('tower-auth-refresh oidc fixture dpop nonce').digest(),
      requireNonce: () => DPOP_TOKEN_NONCE,
    },
    resourceIndicators: {
      enabled: true,
      // A client_credentials request without a `resource` parameter gets
      // this one, so plain RFC 6749 requests receive an access token.
      defaultResource: async (_ctx, _client, oneOf) => oneOf ?? RESOURCE,
      useGrantedResource: async () => true,
      getResourceServerInfo: async (_ctx, resourceIndicator) => {
        if (resourceIndicator !== RESOURCE) {
          throw new errors.InvalidTarget();
        }
        return {
          scope: CLIENT_SCOPE,
          accessTokenTTL: ACCESS_TOKEN_TTL,
          accessTokenFormat: 'opaque',
        };
      },
    },
  },
  ttl: {
    ClientCredentials: (_ctx, token) => token.resourceServer?.accessTokenTTL ?? ACCESS_TOKEN_TTL,
  },
};

// oidc-provider treats client_secret_basic and client_secret_post as one
// family: a client registered for either is accepted with both. Tighten that
// so a test proves the client really used its registered method. The secret
// comparison runs after oidc-provider has decided which method was used
// (client_secret in the body means post, else an Authorization: Basic header).
function enforceRegisteredSecretMethod(provider) {
  const { prototype } = provider.Client;
  const compare = prototype.compareClientSecret;
  prototype.compareClientSecret = async function compareClientSecret(actual) {
    const ctx = Provider.ctx;
    const used = ctx?.oidc?.params?.client_secret ? 'client_secret_post' : 'client_secret_basic';
    if (
      ['client_secret_basic', 'client_secret_post'].includes(this.clientAuthMethod)
      && used !== this.clientAuthMethod
    ) {
      log(`rejecting ${this.clientId}: used ${used}, registered ${this.clientAuthMethod}`);
      return false;
    }
    return compare.call(this, actual);
  };
}

// oidc-provider's client_credentials grant issues the requested scopes that
// the resource server offers, and none when the request has no `scope`. This
// fixture's contract is `contacts:read` for such a request. The grant reads the
// requested scopes through `ctx.oidc.requestParamScopes` (validateClientScope),
// so default that, for this grant at the token endpoint only.
function defaultClientCredentialsScope(provider) {
  const { prototype } = provider.OIDCContext;
  const descriptor = Object.getOwnPropertyDescriptor(prototype, 'requestParamScopes');
  if (!descriptor?.get) {
    fail('oidc-provider no longer has OIDCContext#requestParamScopes; update defaultClientCredentialsScope');
  }
  Object.defineProperty(prototype, 'requestParamScopes', {
    ...descriptor,
    get() {
      if (
        this.route === 'token'
        && this.params?.grant_type === 'client_credentials'
        && !this.params.scope
      ) {
        return new Set([DEFAULT_SCOPE]);
      }
      return descriptor.get.call(this);
    },
  });
}

// ---- Counters, shared by the token endpoint wrapper and the API -------------

const STAT_NAMES = [
  'requests', 'accepted', 'invalid_token', 'stolen', 'bad_proof', 'replayed_jti',
  'use_dpop_nonce', 'insufficient_scope', 'nonce_rotations', 'token_requests', 'token_requests_ok',
];
const stats = Object.fromEntries(STAT_NAMES.map((name) => [name, 0]));

// ---- The API's DPoP nonce -------------------------------------------------

const newNonce = () => randomBytes(24).toString('base64url');
let apiNonce = newNonce();
// Whether the nonce has rotated at least once: from then on every response carries it.
let apiNonceAnnounced = false;
// Accepted requests since the last rotation (or the last /stats/reset).
let acceptedSinceRotation = 0;

// jti -> iat of every proof that verified. A proof older than the iat window is refused
// anyway, so entries past it are dropped now and then to bound the set.
const seenJti = new Map();
let lastPrune = Math.floor(Date.now() / 1000);

function pruneJti(now) {
  if (now - lastPrune < IAT_WINDOW_SECONDS) return;
  lastPrune = now;
  for (const [jti, iat] of seenJti) {
    if (iat < now - 2 * IAT_WINDOW_SECONDS) seenJti.delete(jti);
  }
}

// ---- The API server -------------------------------------------------------

class Refusal extends Error {
  constructor(status, scheme, error, description, stat, extra = {}) {
    super(description);
    Object.assign(this, { status, scheme, error, description, stat, extra });
  }
}

function challenge(scheme, error, description, extra = {}) {
  const params = [`error="${error}"`, `error_description="${description}"`];
  if (extra.scope) params.push(`scope="${extra.scope}"`);
  if (scheme === 'DPoP') params.push(`algs="${DPOP_ALGS.join(' ')}"`);
  return `${scheme} ${params.join(', ')}`;
}

function sha256Base64url(value) {
  return createHash('sha256').update(value).digest('base64url');
}

async function findToken(provider, value) {
  // Tokens from the client_credentials grant are oidc-provider's ClientCredentials model; other
  // grants issue AccessToken. Both `find`s verify the token and its expiry.
  return (await provider.AccessToken.find(value)) ?? (await provider.ClientCredentials.find(value));
}

// Verify a DPoP proof for a DPoP-bound token: signature and claims, then the key binding, then
// jti replay, then the nonce. Throws a Refusal.
async function checkProof(proof, { method, htu, token, jkt }) {
  const bad = (description) => new Refusal(401, 'DPoP', 'invalid_dpop_proof', description, 'bad_proof');
  let payload;
  let protectedHeader;
  try {
    ({ payload, protectedHeader } = await jwtVerify(proof, EmbeddedJWK, {
      algorithms: DPOP_ALGS,
      typ: 'dpop+jwt',
    }));
  } catch (error) {
    throw bad(`proof does not verify (${error.code ?? error.name})`);
  }
  if (protectedHeader.typ !== 'dpop+jwt') throw bad('typ must be dpop+jwt');
  if ('d' in protectedHeader.jwk) throw bad('jwk must be a public key');
  if (payload.htm !== method) throw bad('htm mismatch');
  if (typeof payload.htu !== 'string' || URL.canParse(payload.htu) === false) throw bad('htu mismatch');
  const claimed = new URL(payload.htu);
  claimed.search = '';
  claimed.hash = '';
  if (claimed.href !== htu) throw bad('htu mismatch');
  const now = Math.floor(Date.now() / 1000);
  if (typeof payload.iat !== 'number' || Math.abs(now - payload.iat) > IAT_WINDOW_SECONDS) {
    throw bad('iat is not recent');
  }
  if (typeof payload.jti !== 'string' || !payload.jti) throw bad('jti missing');
  if (payload.ath !== sha256Base64url(token)) throw bad('ath mismatch');

  if ((await calculateJwkThumbprint(protectedHeader.jwk, 'sha256')) !== jkt) {
    throw new Refusal(401, 'DPoP', 'invalid_token', 'the token is bound to another key', 'stolen');
  }

  pruneJti(now);
  if (seenJti.has(payload.jti)) {
    throw new Refusal(401, 'DPoP', 'invalid_dpop_proof', 'jti was already used', 'replayed_jti');
  }
  seenJti.set(payload.jti, payload.iat);

  if (payload.nonce !== apiNonce) {
    throw new Refusal(
      401, 'DPoP', 'use_dpop_nonce',
      payload.nonce === undefined ? 'nonce is required in the DPoP proof' : 'stale nonce in the DPoP proof',
      'use_dpop_nonce', { nonce: true },
    );
  }
}

// The token and its scheme, or a Refusal.
async function authenticate(provider, req, apiOrigin, pathname) {
  const authorization = req.headers.authorization ?? '';
  const match = /^(Bearer|DPoP) +([^ ]+)$/i.exec(authorization);
  const usedDpop = match ? match[1].toLowerCase() === 'dpop' : req.headers.dpop !== undefined;
  const scheme = usedDpop ? 'DPoP' : 'Bearer';
  if (!match) {
    throw new Refusal(401, scheme, 'invalid_token', 'no access token', 'invalid_token');
  }
  const value = match[2];
  const token = await findToken(provider, value);
  const audience = [token?.aud].flat();
  if (!token || token.isExpired || !audience.includes(RESOURCE)) {
    throw new Refusal(401, scheme, 'invalid_token', 'unknown or expired access token', 'invalid_token');
  }
  if (token.jkt) {
    if (!usedDpop) {
      throw new Refusal(401, 'DPoP', 'invalid_token', 'a DPoP-bound token must come with the DPoP scheme', 'stolen');
    }
    const proof = req.headers.dpop;
    if (typeof proof !== 'string' || !proof) {
      throw new Refusal(401, 'DPoP', 'invalid_token', 'a DPoP-bound token needs a DPoP proof', 'stolen');
    }
    await checkProof(proof, {
      method: req.method,
      htu: new URL(pathname, apiOrigin).href,
      token: value,
      jkt: token.jkt,
    });
  } else if (usedDpop) {
    throw new Refusal(401, 'DPoP', 'invalid_token', 'the token is not DPoP-bound', 'invalid_token');
  }
  return { token, scheme: token.jkt ? 'DPoP' : 'Bearer' };
}

function readBody(req) {
  return new Promise((resolve, reject) => {
    let length = 0;
    req.on('data', (chunk) => { length += chunk.length; });
    req.on('end', () => resolve(length));
    req.on('error', reject);
  });
}

const routes = {
  'GET /contacts': {
    scope: READ,
    async handle(_req, url) {
      const raw = url.searchParams.get('page') ?? '0';
      if (!/^\d+$/.test(raw) || Number(raw) >= API_PAGES) {
        return [400, { error: 'invalid_request', error_description: `page must be 0..${API_PAGES - 1}` }];
      }
      const page = Number(raw);
      const items = Array.from({ length: 10 }, (_, i) => `contact-${page * 10 + i}`);
      return [200, { page, items, next: page + 1 < API_PAGES ? page + 1 : null }];
    },
  },
  'POST /contacts': {
    scope: WRITE,
    async handle(req) {
      return [201, { received: await readBody(req) }];
    },
  },
};

function send(res, status, body, headers = {}) {
  const text = JSON.stringify(body);
  res.writeHead(status, {
    'content-type': 'application/json',
    'content-length': Buffer.byteLength(text),
    'cache-control': 'no-store',
    ...headers,
  });
  res.end(text);
}

function apiHandler(provider, apiOrigin) {
  return async (req, res) => {
    const url = new URL(req.url, apiOrigin);
    if (url.pathname === '/stats' && req.method === 'GET') {
      send(res, 200, stats);
      return;
    }
    if (url.pathname === '/stats/reset' && req.method === 'POST') {
      for (const name of STAT_NAMES) stats[name] = 0;
      acceptedSinceRotation = 0;
      send(res, 200, stats);
      return;
    }
    stats.requests += 1;
    const headers = {};
    const nonceHeader = () => {
      if (apiNonceAnnounced) headers['dpop-nonce'] = apiNonce;
    };
    try {
      const { token, scheme } = await authenticate(provider, req, apiOrigin, url.pathname);
      const route = routes[`${req.method} ${url.pathname}`];
      if (!route) {
        nonceHeader();
        send(res, 404, { error: 'not_found' }, headers);
        return;
      }
      if (!token.scopes.has(route.scope)) {
        throw new Refusal(
          403, scheme, 'insufficient_scope', `this route needs ${route.scope}`,
          'insufficient_scope', { scope: route.scope },
        );
      }
      const [status, body] = await route.handle(req, url);
      if (status >= 200 && status < 300) {
        stats.accepted += 1;
        acceptedSinceRotation += 1;
        if (API_NONCE_EVERY > 0 && acceptedSinceRotation >= API_NONCE_EVERY) {
          acceptedSinceRotation = 0;
          apiNonce = newNonce();
          apiNonceAnnounced = true;
          stats.nonce_rotations += 1;
        }
      }
      nonceHeader();
      send(res, status, body, headers);
    } catch (error) {
      if (!(error instanceof Refusal)) {
        log(`API error: ${error.stack ?? error}`);
        send(res, 500, { error: 'server_error' });
        return;
      }
      stats[error.stat] += 1;
      headers['www-authenticate'] = challenge(error.scheme, error.error, error.description, error.extra);
      if (error.extra.nonce) headers['dpop-nonce'] = apiNonce;
      nonceHeader();
      send(res, error.status, { error: error.error, error_description: error.description }, headers);
    }
  };
}

// ---- Startup --------------------------------------------------------------

function listen(server, port) {
  return new Promise((resolve, reject) => {
    server.once('error', reject);
    server.listen(port, '127.0.0.1', () => {
      server.off('error', reject);
      server.on('error', (err) => fail(`server error: ${err.stack ?? err}`));
      resolve(server.address().port);
    });
  });
}

const idpServer = createServer({ keepAliveTimeout: KEEP_ALIVE_MS });
const apiServer = createServer({ keepAliveTimeout: KEEP_ALIVE_MS });

try {
  const port = await listen(idpServer, Number(portArg));
  const apiPort = await listen(apiServer, 0);
  const issuer = `http://127.0.0.1:${port}`;
  const apiOrigin = `http://127.0.0.1:${apiPort}`;

  const provider = new Provider(issuer, configuration);
  provider.on('server_error', (_ctx, err) => {
    process.stderr.write(`oidc-provider server_error: ${err.stack ?? err}\n`);
  });
  if (STRICT_CLIENT_AUTH) enforceRegisteredSecretMethod(provider);
  defaultClientCredentialsScope(provider);

  // Count every token request, and those answered 200, for the API's /stats.
  const callback = provider.callback();
  idpServer.on('request', (req, res) => {
    if (req.method === 'POST' && new URL(req.url, issuer).pathname === '/token') {
      stats.token_requests += 1;
      res.once('finish', () => {
        if (res.statusCode === 200) stats.token_requests_ok += 1;
      });
    }
    callback(req, res);
  });
  apiServer.on('request', apiHandler(provider, apiOrigin));

  process.stdout.write(`LISTENING ${issuer}\nAPI ${apiOrigin}\n`);
} catch (err) {
  fail(`cannot start: ${err.stack ?? err}`);
}

// A test fixture holds no state worth a graceful shutdown: exit at once.
function shutdown(reason) {
  log(`stopping (${reason})`);
  process.exit(0);
}

process.on('SIGTERM', () => shutdown('SIGTERM'));
process.on('SIGINT', () => shutdown('SIGINT'));

// Die with the process that spawned us: it holds the write end of our stdin.
process.stdin.on('end', () => shutdown('stdin closed'));
process.stdin.on('close', () => shutdown('stdin closed'));
process.stdin.on('error', () => shutdown('stdin error'));
process.stdin.resume();
