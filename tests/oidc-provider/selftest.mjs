// Self-test of the fixture's contract (README.md): starts server.mjs as a child and drives the
// token endpoint and the API with real DPoP proofs made by jose. Exits non-zero on any failed
// check.
//
//   npm test --prefix tests/oidc-provider

import { spawn } from 'node:child_process';
import { createHash, randomUUID } from 'node:crypto';
import { fileURLToPath } from 'node:url';

import {
  calculateJwkThumbprint, exportJWK, generateKeyPair, SignJWT,
} from 'jose';

const SERVER = fileURLToPath(new URL('./server.mjs', import.meta.url));

let failures = 0;
let checks = 0;

function check(condition, what, detail) {
  checks += 1;
  if (condition) return;
  failures += 1;
  process.stderr.write(`FAIL: ${what}${detail === undefined ? '' : `\n      ${JSON.stringify(detail)}`}\n`);
}

function equal(actual, expected, what) {
  const ok = JSON.stringify(actual) === JSON.stringify(expected);
  check(ok, what, ok ? undefined : { actual, expected });
}

// ---- The fixture as a child process ----------------------------------------

async function startFixture(env) {
  const child = spawn(process.execPath, [SERVER, '0'], {
    env: { ...process.env, ...env },
    stdio: ['pipe', 'pipe', 'pipe'],
  });
  let stderr = '';
  child.stderr.on('data', (chunk) => { stderr += chunk; });
  let stdout = '';
  const firstChunk = await new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`no startup lines within 30 s; stderr:\n${stderr}`)), 30_000);
    child.stdout.once('data', (chunk) => { clearTimeout(timer); resolve(chunk.toString()); });
    child.once('exit', (code) => { clearTimeout(timer); reject(new Error(`exited ${code}; stderr:\n${stderr}`)); });
  });
  // Anything after the first write is a contract violation.
  child.stdout.on('data', (chunk) => { stdout += chunk; });
  const match = /^LISTENING (http:\/\/127\.0\.0\.1:\d+)\nAPI (http:\/\/127\.0\.0\.1:\d+)\n$/.exec(firstChunk);
  check(match, 'startup writes exactly two lines in one write', firstChunk);
  if (!match) throw new Error('cannot continue without the startup lines');
  const exited = new Promise((resolve) => child.once('exit', (code, signal) => resolve({ code, signal })));
  return {
    issuer: match[1],
    api: match[2],
    extraStdout: () => stdout,
    async stop() {
      child.stdin.end();
      return exited;
    },
  };
}

// ---- HTTP helpers ---------------------------------------------------------

async function call(url, { method = 'GET', headers = {}, body } = {}) {
  const response = await fetch(url, { method, headers, body });
  const text = await response.text();
  let json;
  try { json = JSON.parse(text); } catch { json = undefined; }
  return { status: response.status, headers: response.headers, json, text };
}

const ath = (token) => createHash('sha256').update(token).digest('base64url');

async function newKey(alg = 'ES256') {
  const { privateKey, publicKey } = await generateKeyPair(alg, { extractable: true });
  const jwk = await exportJWK(publicKey);
  return { alg, privateKey, jwk, jkt: await calculateJwkThumbprint(jwk) };
}

async function proof(key, {
  htm, htu, token, nonce, jti = randomUUID(), iat = Math.floor(Date.now() / 1000), typ = 'dpop+jwt',
}) {
  const payload = { htm, htu, jti };
  if (token !== undefined) payload.ath = ath(token);
  if (nonce !== undefined) payload.nonce = nonce;
  return new SignJWT(payload)
    .setProtectedHeader({ alg: key.alg, typ, jwk: key.jwk })
    .setIssuedAt(iat)
    .sign(key.privateKey);
}

// A token request; `key` adds a DPoP proof (with `nonce` if given).
async function tokenRequest(fx, {
  clientId, secret, basic = false, scope, key, nonce,
}) {
  const form = new URLSearchParams({ grant_type: 'client_credentials' });
  if (scope !== undefined) form.set('scope', scope);
  const headers = { 'content-type': 'application/x-www-form-urlencoded' };
  if (basic) {
    const encode = (value) => encodeURIComponent(value).replace(/%20/g, '+');
    headers.authorization = `Basic ${Buffer.from(`${encode(clientId)}:${encode(secret)}`).toString('base64')}`;
  } else {
    form.set('client_id', clientId);
    form.set('client_secret', secret);
  }
  if (key) headers.dpop = await proof(key, { htm: 'POST', htu: `${fx.issuer}/token`, nonce });
  return call(`${fx.issuer}/token`, { method: 'POST', headers, body: form.toString() });
}

// The DPoP nonce dance at the token endpoint: 400 use_dpop_nonce, then the token.
async function dpopToken(fx, key, scope) {
  const first = await tokenRequest(fx, { clientId: 'batch-dpop', secret: 'dp0p-secret', key, scope });
  equal(first.status, 400, 'token request without a nonce: 400');
  equal(first.json?.error, 'use_dpop_nonce', 'token request without a nonce: use_dpop_nonce');
  const nonce = first.headers.get('dpop-nonce');
  check(nonce, 'token request without a nonce: DPoP-Nonce header');
  const second = await tokenRequest(fx, {
    clientId: 'batch-dpop', secret: 'dp0p-secret', key, scope, nonce,
  });
  equal(second.status, 200, 'token request with the nonce: 200');
  return second.json;
}

// An API call with a DPoP-bound token.
async function dpopCall(fx, key, token, nonce, { method = 'GET', path = '/contacts?page=0', body, proofOptions = {} } = {}) {
  const url = new URL(path, fx.api);
  const dpop = await proof(key, {
    htm: method, htu: `${fx.api}${url.pathname}`, token, nonce, ...proofOptions,
  });
  const headers = { authorization: `DPoP ${token}`, dpop };
  if (body !== undefined) headers['content-type'] = 'application/json';
  const response = await call(url, { method, headers, body });
  return { ...response, proof: dpop };
}

const bearerCall = (fx, token, { method = 'GET', path = '/contacts?page=0', body, scheme = 'Bearer' } = {}) => call(
  new URL(path, fx.api),
  {
    method,
    headers: { authorization: `${scheme} ${token}`, ...(body ? { 'content-type': 'application/json' } : {}) },
    body,
  },
);

const stats = async (fx) => (await call(`${fx.api}/stats`)).json;

// ---- Main fixture: nonces required, rotation every 5 accepted requests, 3 pages ------------

async function mainScenario() {
  const fx = await startFixture({ API_NONCE_EVERY: '5', API_PAGES: '3', ACCESS_TOKEN_TTL: '600' });
  try {
    const discovery = await call(`${fx.issuer}/.well-known/openid-configuration`);
    equal(discovery.json?.dpop_signing_alg_values_supported, ['ES256'], 'discovery: DPoP algs');
    equal(await stats(fx), {
      requests: 0, accepted: 0, invalid_token: 0, stolen: 0, bad_proof: 0, replayed_jti: 0,
      use_dpop_nonce: 0, insufficient_scope: 0, nonce_rotations: 0, token_requests: 0, token_requests_ok: 0,
    }, 'stats start at zero, with every name');

    // batch-dpop without a proof is refused.
    const noProof = await tokenRequest(fx, { clientId: 'batch-dpop', secret: 'dp0p-secret' });
    equal([noProof.status, noProof.json?.error], [400, 'invalid_grant'], 'batch-dpop without a proof is refused');

    const key = await newKey();
    const issued = await dpopToken(fx, key);
    equal(issued?.token_type, 'DPoP', 'DPoP token type');
    equal(issued?.scope, 'contacts:read', 'no scope requested: contacts:read');
    equal(issued?.expires_in, 600, 'expires_in is ACCESS_TOKEN_TTL');
    const token = issued.access_token;
    let st = await stats(fx);
    equal([st.token_requests, st.token_requests_ok], [3, 1], 'token requests counted: 3, 1 ok');

    // The API nonce dance.
    const noNonce = await dpopCall(fx, key, token, undefined);
    equal(noNonce.status, 401, 'API without a nonce: 401');
    check(/^DPoP error="use_dpop_nonce", error_description="[^"]+"/.test(noNonce.headers.get('www-authenticate')),
      'API without a nonce: use_dpop_nonce challenge', noNonce.headers.get('www-authenticate'));
    let nonce = noNonce.headers.get('dpop-nonce');
    check(/^[A-Za-z0-9_-]{20,}$/.test(nonce ?? ''), 'API without a nonce: DPoP-Nonce', nonce);

    const page0 = await dpopCall(fx, key, token, nonce);
    equal(page0.status, 200, 'GET /contacts with proof and nonce: 200');
    equal(page0.json, {
      page: 0,
      items: Array.from({ length: 10 }, (_, i) => `contact-${i}`),
      next: 1,
    }, 'page 0');
    equal(page0.headers.get('dpop-nonce'), null, 'no DPoP-Nonce before the first rotation');
    const page2 = await dpopCall(fx, key, token, nonce, { path: '/contacts?page=2' });
    equal([page2.json?.page, page2.json?.items?.[9], page2.json?.next], [2, 'contact-29', null], 'last page: next null');

    // Replayed jti: the exact proof of an accepted request again.
    const replay = await call(new URL('/contacts?page=0', fx.api), {
      headers: { authorization: `DPoP ${token}`, dpop: page0.proof },
    });
    equal(replay.status, 401, 'replayed proof: 401');
    check(replay.headers.get('www-authenticate')?.startsWith('DPoP error="invalid_dpop_proof"'),
      'replayed proof: invalid_dpop_proof', replay.headers.get('www-authenticate'));

    // Accepted so far: 2. Three more reach the rotation; the third carries the new nonce.
    for (let page = 0; page < 2; page += 1) {
      const ok = await dpopCall(fx, key, token, nonce, { path: `/contacts?page=${page}` });
      equal([ok.status, ok.headers.get('dpop-nonce')], [200, null], `accepted request ${page + 3}`);
    }
    const rotating = await dpopCall(fx, key, token, nonce);
    equal(rotating.status, 200, 'the 5th accepted request: 200');
    const rotated = rotating.headers.get('dpop-nonce');
    check(rotated && rotated !== nonce, 'the 5th accepted request carries a new nonce', rotated);
    const stale = await dpopCall(fx, key, token, nonce);
    equal(stale.status, 401, 'the previous nonce is refused');
    check(stale.headers.get('www-authenticate')?.startsWith('DPoP error="use_dpop_nonce"'), 'stale nonce: use_dpop_nonce');
    equal(stale.headers.get('dpop-nonce'), rotated, 'stale nonce: the current nonce in DPoP-Nonce');
    nonce = rotated;
    const afterRotation = await dpopCall(fx, key, token, nonce);
    equal([afterRotation.status, afterRotation.headers.get('dpop-nonce')], [200, nonce],
      'after a rotation every response carries the current nonce');

    // Stolen token: as Bearer, without a proof, with another key's proof.
    const asBearer = await bearerCall(fx, token);
    equal(asBearer.status, 401, 'DPoP token as Bearer: 401');
    check(asBearer.headers.get('www-authenticate')?.startsWith('DPoP error="invalid_token"'),
      'DPoP token as Bearer: DPoP invalid_token', asBearer.headers.get('www-authenticate'));
    check(asBearer.headers.get('www-authenticate')?.includes('algs="ES256"'), 'DPoP challenge lists algs');
    const bearerWithProof = await call(new URL('/contacts', fx.api), {
      headers: {
        authorization: `Bearer ${token}`,
        dpop: await proof(key, { htm: 'GET', htu: `${fx.api}/contacts`, token, nonce }),
      },
    });
    equal(bearerWithProof.status, 401, 'DPoP token as Bearer, even with a valid proof: 401');
    const withoutProof = await bearerCall(fx, token, { scheme: 'DPoP' });
    equal(withoutProof.status, 401, 'DPoP token without a proof: 401');
    const thief = await newKey();
    const otherKey = await dpopCall(fx, thief, token, nonce);
    equal(otherKey.status, 401, 'DPoP token with another key\'s proof: 401');
    check(otherKey.headers.get('www-authenticate')?.startsWith('DPoP error="invalid_token"'),
      'another key: invalid_token', otherKey.headers.get('www-authenticate'));

    // Bad proofs: wrong htu, wrong htm, wrong ath, old iat, wrong typ, another algorithm.
    const badProofs = [
      ['wrong htu', { proofOptions: { htu: `${fx.api}/other` } }],
      ['htu with another origin', { proofOptions: { htu: `${fx.issuer}/contacts` } }],
      ['wrong htm', { proofOptions: { htm: 'POST' } }],
      ['wrong ath', { proofOptions: { token: `${token}x` } }],
      ['old iat', { proofOptions: { iat: Math.floor(Date.now() / 1000) - 120 } }],
      ['wrong typ', { proofOptions: { typ: 'JWT' } }],
    ];
    for (const [what, options] of badProofs) {
      const refused = await dpopCall(fx, key, token, nonce, options);
      equal(refused.status, 401, `${what}: 401`);
      check(refused.headers.get('www-authenticate')?.startsWith('DPoP error="invalid_dpop_proof"'),
        `${what}: invalid_dpop_proof`, refused.headers.get('www-authenticate'));
    }
    const es384 = await newKey('ES384');
    const es384Proof = await dpopCall(fx, es384, token, nonce);
    equal(es384Proof.status, 401, 'ES384 proof: 401 (ES256 only)');
    // The query string is not part of htu: a proof for the path alone is right.
    const withQuery = await dpopCall(fx, key, token, nonce, { path: '/contacts?page=1' });
    equal(withQuery.status, 200, 'htu without the query: 200');

    // insufficient_scope, then a contacts:write token.
    const write = await dpopCall(fx, key, token, nonce, { method: 'POST', path: '/contacts', body: '{"name":"a"}' });
    equal(write.status, 403, 'POST with a contacts:read token: 403');
    equal(write.headers.get('www-authenticate'),
      'DPoP error="insufficient_scope", error_description="this route needs contacts:write", scope="contacts:write", algs="ES256"',
      'insufficient_scope challenge');
    const writer = await dpopToken(fx, key, 'contacts:write');
    equal([writer?.token_type, writer?.scope], ['DPoP', 'contacts:write'], 'scope=contacts:write: exactly that');
    const body = JSON.stringify({ name: 'Ada', tags: ['x'.repeat(1000)] });
    const created = await dpopCall(fx, key, writer.access_token, nonce, { method: 'POST', path: '/contacts', body });
    equal([created.status, created.json], [201, { received: Buffer.byteLength(body) }], 'POST with contacts:write: 201');
    const both = await dpopToken(fx, key, 'contacts:read contacts:write');
    equal(both?.scope, 'contacts:read contacts:write', 'both scopes requested: both');

    // 404 after authentication; an invalid page is 400.
    equal((await dpopCall(fx, key, token, nonce, { path: '/nowhere' })).status, 404, 'unknown route: 404');
    equal((await dpopCall(fx, key, token, nonce, { path: '/contacts?page=3' })).status, 400, 'page past the end: 400');

    // Unknown token.
    const unknown = await bearerCall(fx, 'not-a-token');
    equal([unknown.status, unknown.headers.get('www-authenticate')?.split(',')[0]],
      [401, 'Bearer error="invalid_token"'], 'unknown token: Bearer invalid_token');
    const unknownDpop = await bearerCall(fx, 'not-a-token', { scheme: 'DPoP' });
    check(unknownDpop.headers.get('www-authenticate')?.startsWith('DPoP error="invalid_token"'), 'unknown token via DPoP: DPoP challenge');

    st = await stats(fx);
    equal(st, {
      // the buckets below (25, disjoint) + the 404 + the 400
      requests: 27,
      // page0, page2, 2 more, the 5th, after rotation, with query, created
      accepted: 8,
      invalid_token: 2,
      stolen: 4,
      bad_proof: 7,
      replayed_jti: 1,
      use_dpop_nonce: 2,
      insufficient_scope: 1,
      nonce_rotations: 1,
      token_requests: 7,
      token_requests_ok: 3,
    }, 'exact DPoP stats');
    check(st.requests >= st.accepted, 'requests >= accepted');

    // Bearer clients: post and basic, default and requested scopes.
    equal((await call(`${fx.api}/stats/reset`, { method: 'POST' })).status, 200, 'reset: 200');
    const post = await tokenRequest(fx, { clientId: 'batch-post', secret: 'p0st-secret' });
    equal([post.status, post.json?.token_type, post.json?.scope], [200, 'Bearer', 'contacts:read'], 'batch-post: Bearer, contacts:read');
    const read = await bearerCall(fx, post.json.access_token);
    equal([read.status, read.json?.page], [200, 0], 'Bearer GET /contacts: 200');
    const forbidden = await bearerCall(fx, post.json.access_token, { method: 'POST', path: '/contacts', body: '{}' });
    equal([forbidden.status, forbidden.headers.get('www-authenticate')],
      [403, 'Bearer error="insufficient_scope", error_description="this route needs contacts:write", scope="contacts:write"'],
      'Bearer insufficient_scope');
    const asDpop = await bearerCall(fx, post.json.access_token, { scheme: 'DPoP' });
    equal(asDpop.status, 401, 'an unbound token with the DPoP scheme: 401');
    const basic = await tokenRequest(fx, {
      clientId: 'batch-basic', secret: 'b@tch s3cret/+&=', basic: true, scope: 'contacts:read contacts:write',
    });
    equal([basic.status, basic.json?.token_type, basic.json?.scope],
      [200, 'Bearer', 'contacts:read contacts:write'], 'batch-basic with both scopes');
    const posted = await bearerCall(fx, basic.json.access_token, { method: 'POST', path: '/contacts', body: '{"a":1}' });
    equal([posted.status, posted.json], [201, { received: 7 }], 'Bearer POST with contacts:write: 201');
    const wrongMethod = await tokenRequest(fx, { clientId: 'batch-post', secret: 'p0st-secret', basic: true });
    equal([wrongMethod.status, wrongMethod.json?.error], [401, 'invalid_client'], 'registered auth method enforced');
    const unknownScope = await tokenRequest(fx, { clientId: 'batch-post', secret: 'p0st-secret', scope: 'admin' });
    equal([unknownScope.status, unknownScope.json?.scope], [200, undefined], 'a scope the API does not offer is dropped');

    equal(await stats(fx), {
      requests: 4,
      accepted: 2,
      invalid_token: 1,
      stolen: 0,
      bad_proof: 0,
      replayed_jti: 0,
      use_dpop_nonce: 0,
      insufficient_scope: 1,
      nonce_rotations: 0,
      token_requests: 4,
      token_requests_ok: 3,
    }, 'exact Bearer stats after reset');

    check(fx.extraStdout() === '', 'nothing else on stdout', fx.extraStdout());
  } finally {
    const { code } = await fx.stop();
    equal(code, 0, 'exits 0 when stdin closes');
  }
}

// ---- Second fixture: no token nonce, no rotation, 2 s tokens -----------------------------

async function expiryScenario() {
  const fx = await startFixture({ DPOP_TOKEN_NONCE: '0', API_NONCE_EVERY: '0', ACCESS_TOKEN_TTL: '2' });
  try {
    const key = await newKey();
    const issued = await tokenRequest(fx, { clientId: 'batch-dpop', secret: 'dp0p-secret', key });
    equal([issued.status, issued.json?.token_type], [200, 'DPoP'], 'DPOP_TOKEN_NONCE=0: a token without a nonce');
    const token = issued.json.access_token;
    const first = await dpopCall(fx, key, token, undefined);
    const nonce = first.headers.get('dpop-nonce');
    let accepted = 0;
    let rotatedHeader = false;
    for (let i = 0; i < 20; i += 1) {
      const ok = await dpopCall(fx, key, token, nonce);
      if (ok.status === 200) accepted += 1;
      if (ok.headers.get('dpop-nonce') !== null) rotatedHeader = true;
    }
    // The token (1 to 2 s left: expiry is counted in whole seconds) may expire during the loop on a slow machine; every request before then passes.
    check(accepted > 0, 'API_NONCE_EVERY=0: the first nonce keeps working', accepted);
    check(!rotatedHeader, 'API_NONCE_EVERY=0: no rotation');
    await new Promise((resolve) => { setTimeout(resolve, 3100); });
    const expired = await dpopCall(fx, key, token, nonce);
    equal(expired.status, 401, 'an expired token: 401');
    check(expired.headers.get('www-authenticate')?.startsWith('DPoP error="invalid_token"'),
      'expired token: invalid_token', expired.headers.get('www-authenticate'));
    const st = await stats(fx);
    equal([st.nonce_rotations, st.invalid_token, st.use_dpop_nonce], [0, 1 + 20 - accepted, 1], 'expiry stats');
  } finally {
    await fx.stop();
  }
}

try {
  await mainScenario();
  await expiryScenario();
} catch (error) {
  failures += 1;
  process.stderr.write(`FAIL: ${error.stack ?? error}\n`);
}

process.stderr.write(`${checks} checks, ${failures} failed\n`);
process.exit(failures ? 1 : 0);
