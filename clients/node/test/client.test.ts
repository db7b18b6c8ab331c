import assert from "node:assert/strict";
import { createServer, type Server, type Socket } from "node:net";
import { afterEach, beforeEach, describe, it } from "node:test";

import { DisableReason, KeysvcClient, KeysvcError, OutcomeAction, status } from "../src";
import { keyHash, SECRETS, startServer, type LiveServer } from "./server";

async function rejectsWith(promise: Promise<unknown>, code: status, reason: string | undefined) {
  const error = await promise.then(
    () => assert.fail("the call succeeded"),
    (e: unknown) => e,
  );
  assert.ok(error instanceof KeysvcError, `want KeysvcError, got ${String(error)}`);
  assert.equal(error.codeName, status[code]);
  assert.equal(error.reason, reason);
  return error;
}

describe("KeysvcClient against a live keysvc", () => {
  let server: LiveServer;
  let client: KeysvcClient;

  beforeEach(async () => {
    server = await startServer();
    client = new KeysvcClient(server.target);
  });
  afterEach(async () => {
    client.close();
    assert.equal(await server.stop(), 0);
  });

  it("Get returns a known secret and its hash", async () => {
    const lease = await client.get("gpt-4o");
    assert.ok(SECRETS.includes(lease.secret));
    assert.equal(lease.key.hash, keyHash(lease.secret));
    assert.ok(lease.key.modelFamilies.includes("gpt4o"));
    assert.ok(lease.key.lastUsed instanceof Date);
  });

  it("Gets rotate across every key", async () => {
    const secrets = [];
    for (const _ of SECRETS) secrets.push((await client.get("gpt-4o")).secret);
    assert.deepEqual(secrets.sort(), [...SECRETS].sort());
  });

  it("a disabled key is never handed out", async () => {
    const dead = keyHash(SECRETS[0]!);
    const key = await client.disable(dead, DisableReason.DISABLE_REASON_MANUAL);
    assert.equal(key.isDisabled, true);
    assert.equal(key.disableReason, DisableReason.DISABLE_REASON_MANUAL);
    for (let i = 0; i < 3 * SECRETS.length; i++) {
      assert.notEqual((await client.get("gpt-4o")).key.hash, dead);
    }
    assert.equal(await client.available(), SECRETS.length - 1);
    await client.recheck();
    assert.equal(await client.available(), SECRETS.length);
  });

  it("an unknown hash is NOT_FOUND with reason KEY_NOT_FOUND", async () => {
    const error = await rejectsWith(client.disable("oai-00000000"), status.NOT_FOUND, "KEY_NOT_FOUND");
    assert.equal(error.domain, "keysvc");
    assert.deepEqual(error.metadata, { hash: "oai-00000000" });
    await rejectsWith(client.markRateLimited("oai-ffffffff"), status.NOT_FOUND, "KEY_NOT_FOUND");
  });

  it("no key for the family is FAILED_PRECONDITION with reason NO_KEYS_FOR_FAMILY", async () => {
    // Unchecked keys never get gpt4-32k: only the key checker can grant it.
    const error = await rejectsWith(
      client.get("gpt-4-32k"),
      status.FAILED_PRECONDITION,
      "NO_KEYS_FOR_FAMILY",
    );
    assert.equal(error.metadata.family, "gpt4-32k");
    await rejectsWith(client.get(""), status.INVALID_ARGUMENT, "INVALID_ARGUMENT");
  });

  it("reports change what List shows", async () => {
    const lease = await client.get("gpt-4o");
    const headers = new Headers({
      "X-RateLimit-Reset-Requests": "2s",
      "x-ratelimit-reset-tokens": "500ms",
      "content-type": "application/json",
    });
    await client.updateRateLimits(lease.key.hash, headers);
    await client.incrementUsage(lease.key.hash, "gpt-4o", 120);
    await client.markRateLimited(lease.key.hash, "gpt-4o");
    const keys = await client.list();
    assert.deepEqual(keys.map((k) => k.hash), SECRETS.map(keyHash));
    const key = keys.find((k) => k.hash === lease.key.hash)!;
    assert.deepEqual(key.rateLimitRequestsReset, { seconds: 2, nanos: 0 });
    assert.deepEqual(key.rateLimitTokensReset, { seconds: 0, nanos: 500_000_000 });
    assert.equal(key.promptCount, 1);
    assert.equal(key.tokenUsage.gpt4o, 120);
    assert.ok(key.rateLimitedUntil! > key.rateLimitedAt!);
  });

  it("node:http style headers work too", async () => {
    const lease = await client.get("gpt-4o");
    await client.updateRateLimits(lease.key.hash, { "x-ratelimit-reset-requests": ["3s"], date: "x" });
    const key = (await client.list()).find((k) => k.hash === lease.key.hash)!;
    assert.deepEqual(key.rateLimitRequestsReset, { seconds: 3, nanos: 0 });
  });

  it("GetLockoutPeriod once every key is busy", async () => {
    assert.equal(await client.getLockoutPeriod("gpt-4o"), 0);
    // Each key answered 429 (no headers: locked 10 s), so the lock outlasts a slow machine
    // rather than the 1 s a Get alone throttles a key for.
    for (const _ of SECRETS) {
      const lease = await client.get("gpt-4o");
      await client.markRateLimited(lease.key.hash, "gpt-4o");
    }
    const lockout = await client.getLockoutPeriod("gpt-4o");
    assert.ok(lockout > 1000 && lockout <= 10000, `lockout ${lockout} ms`);
  });

  it("ReportOutcome says what to do with the request", async () => {
    const lease = await client.get("gpt-4o");
    const done = await client.reportOutcome({
      hash: lease.key.hash,
      model: "gpt-4o",
      status: 200,
      headers: { "X-RateLimit-Remaining-Requests": "10", date: "x" },
      promptTokens: 100,
      completionTokens: 20,
    });
    assert.equal(done.action, OutcomeAction.OUTCOME_ACTION_DONE);
    assert.equal(done.key.tokenUsage["gpt4o"], 120);
    const busy = await client.reportOutcome({
      hash: lease.key.hash,
      model: "gpt-4o",
      status: 429,
      error: { type: "requests", code: "rate_limit_exceeded", message: "Rate limit reached" },
    });
    assert.equal(busy.action, OutcomeAction.OUTCOME_ACTION_RETRY_WITH_ANOTHER_KEY);
    const perDay = await client.reportOutcome({
      hash: lease.key.hash,
      model: "gpt-4o",
      status: 429,
      error: { type: "requests", message: "Rate limit reached on requests per day (RPD)" },
    });
    assert.equal(perDay.action, OutcomeAction.OUTCOME_ACTION_RETURN_ERROR);
    const dead = await client.reportOutcome({ hash: lease.key.hash, model: "gpt-4o", status: 401 });
    assert.equal(dead.action, OutcomeAction.OUTCOME_ACTION_RETRY_WITH_ANOTHER_KEY);
    assert.equal(dead.key.isRevoked, true);
    assert.equal(await client.available(), SECRETS.length - 1);
  });

  it("Get with maxWaitMs waits for a key to unlock", async () => {
    const first = (await client.get("gpt-4o")).key.hash;
    for (const _ of SECRETS.slice(1)) await client.get("gpt-4o"); // all throttled 1 s
    const started = Date.now();
    const lease = await client.get("gpt-4o", { maxWaitMs: 5000 });
    const waited = Date.now() - started;
    assert.equal(lease.key.hash, first);
    assert.ok(waited > 500 && waited < 3000, `waited ${waited} ms`);
    await rejectsWith(client.get("gpt-4o", { maxWaitMs: 61000 }), status.INVALID_ARGUMENT, "INVALID_ARGUMENT");
  });

  it("an expired per-call deadline is honoured", async () => {
    await rejectsWith(client.get("gpt-4o", { timeoutMs: -1000 }), status.DEADLINE_EXCEEDED, undefined);
    assert.ok((await client.get("gpt-4o", { timeoutMs: 5000 })).secret);
  });

  it("a token goes along", async () => {
    // The server does not check tokens yet; the call must still work with one set.
    const withToken = new KeysvcClient(server.target, { token: "t0ken" });
    try {
      assert.ok((await withToken.get("gpt-4o")).secret);
    } finally {
      withToken.close();
    }
    assert.throws(() => new KeysvcClient(server.target, { token: "a\nb" }), TypeError);
  });
});

describe("deadlines", () => {
  let silent: Server;
  const sockets: Socket[] = [];
  beforeEach(async () => {
    silent = createServer((socket) => sockets.push(socket)); // accepts, never answers
    await new Promise<void>((listening) => silent.listen(0, "127.0.0.1", listening));
  });
  afterEach(async () => {
    for (const socket of sockets) socket.destroy();
    await new Promise((closed) => silent.close(closed));
  });

  it("the client's default timeout bounds a call to a silent server", async () => {
    const address = silent.address();
    assert.ok(address && typeof address === "object");
    const client = new KeysvcClient(`127.0.0.1:${address.port}`, { timeoutMs: 500 });
    const start = Date.now();
    try {
      await rejectsWith(client.available(), status.DEADLINE_EXCEEDED, undefined);
    } finally {
      client.close();
    }
    const elapsed = Date.now() - start;
    assert.ok(elapsed >= 400 && elapsed < 3000, `took ${elapsed} ms with a 500 ms timeout`);
  });
});
