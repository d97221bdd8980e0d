// Loopback OpenID Connect provider (oidc-provider) for tower-auth-refresh
// integration tests.
//
//   node server.mjs <port>      (0 = pick a free port)
//
// Prints exactly one line to stdout once it is listening:
//   LISTENING http://127.0.0.1:<port>
// Everything else goes to stderr. Exits when stdin closes, and on SIGTERM /
// SIGINT.
//
// Env:
//   ACCESS_TOKEN_TTL    access token lifetime in seconds (default 3600)
//   STRICT_CLIENT_AUTH  "1" (default): a client must authenticate with the
//                       method it is registered with. Stock oidc-provider
//                       accepts client_secret_basic and client_secret_post
//                       interchangeably; "0" restores that behaviour.

import { createServer } from 'node:http';

// stdout carries only the LISTENING line. oidc-provider prints its NOTICEs
// with console.info, so send every console method that targets stdout to
// stderr before the library is loaded (hence the dynamic import below).
for (const method of ['log', 'info', 'debug', 'dir', 'table']) {
  console[method] = console.error;
}

const { default: Provider, errors } = await import('oidc-provider');

function fail(message) {
  process.stderr.write(`oidc-provider fixture: ${message}\n`);
  process.exit(2);
}

const portArg = process.argv[2] ?? '0';
if (!/^\d+$/.test(portArg) || Number(portArg) > 65535) {
  fail(`invalid port argument: ${JSON.stringify(portArg)}`);
}

const ttlArg = process.env.ACCESS_TOKEN_TTL ?? '3600';
if (!/^\d+$/.test(ttlArg) || Number(ttlArg) < 1) {
  fail(`ACCESS_TOKEN_TTL must be a positive integer of seconds, got ${JSON.stringify(ttlArg)}`);
}
const ACCESS_TOKEN_TTL = Number(ttlArg);

const strictArg = process.env.STRICT_CLIENT_AUTH ?? '1';
if (strictArg !== '0' && strictArg !== '1') {
  fail(`STRICT_CLIENT_AUTH must be 0 or 1, got ${JSON.stringify(strictArg)}`);
}
const STRICT_CLIENT_AUTH = strictArg === '1';

const RESOURCE = 'urn:api';
const SCOPE = 'contacts:read';

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
    scope: SCOPE,
  },
  {
    client_id: 'batch-post',
    client_secret: 'p0st-secret',
    grant_types: ['client_credentials'],
    response_types: [],
    redirect_uris: [],
    token_endpoint_auth_method: 'client_secret_post',
    scope: SCOPE,
  },
];

// Signing keys: oidc-provider's built-in development keys. Generating an RSA key here and
// exporting it as a JWK can deadlock Node.js 20 (a garbage collection during the export runs
// the key-generation job's destructor, which takes the lock the export holds); the tokens
// this fixture issues are opaque, so nothing depends on the key.

const configuration = {
  clients,
  cookies: { keys: ['tower-auth-refresh-oidc-fixture-cookie-key'] },
  scopes: ['openid', 'offline_access', SCOPE],
  features: {
    devInteractions: { enabled: false },
    clientCredentials: { enabled: true },
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
          scope: SCOPE,
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
      process.stderr.write(
        `oidc-provider fixture: rejecting ${this.clientId}: used ${used}, registered ${this.clientAuthMethod}\n`,
      );
      return false;
    }
    return compare.call(this, actual);
  };
}

const server = createServer();

server.on('error', (err) => fail(`server error: ${err.stack ?? err}`));

server.listen(Number(portArg), '127.0.0.1', () => {
  const { port } = server.address();
  const issuer = `http://127.0.0.1:${port}`;

  const provider = new Provider(issuer, configuration);
  provider.on('server_error', (_ctx, err) => {
    process.stderr.write(`oidc-provider server_error: ${err.stack ?? err}\n`);
  });
  if (STRICT_CLIENT_AUTH) enforceRegisteredSecretMethod(provider);
  server.on('request', provider.callback());

  process.stdout.write(`LISTENING ${issuer}\n`);
});

// A test fixture holds no state worth a graceful shutdown: exit at once.
function shutdown(reason) {
  process.stderr.write(`oidc-provider fixture: stopping (${reason})\n`);
  process.exit(0);
}

process.on('SIGTERM', () => shutdown('SIGTERM'));
process.on('SIGINT', () => shutdown('SIGINT'));

// Die with the process that spawned us: it holds the write end of our stdin.
process.stdin.on('end', () => shutdown('stdin closed'));
process.stdin.on('close', () => shutdown('stdin closed'));
process.stdin.on('error', () => shutdown('stdin error'));
process.stdin.resume();
