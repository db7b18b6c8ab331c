import assert from "node:assert/strict";
import { afterEach, beforeEach, describe, it } from "node:test";

import { DisableReason, KeyState, KeysvcClient, KeysvcError, status } from "../src";
import { keyHash, startServer, type LiveServer } from "./server";

/** Seven keys, and a server maximum page size of 2: four pages. */
const PAGED = Array.from({ length: 7 }, (_, n) => `sk-client-page-${n}`);

describe("List pages against a live keysvc", () => {
  let server: LiveServer;
  let client: KeysvcClient;

  beforeEach(async () => {
    server = await startServer(PAGED, { KEYSVC_LIST_MAX_PAGE_SIZE: "2" });
    client = new KeysvcClient(server.target);
  });
  afterEach(async () => {
    client.close();
    assert.equal(await server.stop(), 0);
  });

  it("list and keys() page through every key in load order", async () => {
    const want = PAGED.map(keyHash);
    assert.deepEqual((await client.list()).map((k) => k.hash), want);
    const seen: string[] = [];
    for await (const key of client.keys()) seen.push(key.hash);
    assert.deepEqual(seen, want);
  });

  it("listPage returns one page and a token for the next", async () => {
    const first = await client.listPage();
    assert.equal(first.keys.length, 2);
    assert.notEqual(first.nextPageToken, "");
    const second = await client.listPage({ pageToken: first.nextPageToken, pageSize: 1 });
    assert.deepEqual(second.keys.map((k) => k.hash), [keyHash(PAGED[2]!)]);
  });

  it("filters by state", async () => {
    await client.disable(keyHash(PAGED[3]!), DisableReason.DISABLE_REASON_MANUAL);
    const lease = await client.get("gpt-4o");
    const hashes = async (state: KeyState) =>
      (await client.list(undefined, state)).map((k) => k.hash);
    assert.deepEqual(await hashes(KeyState.KEY_STATE_DISABLED), [keyHash(PAGED[3]!)]);
    assert.deepEqual(await hashes(KeyState.KEY_STATE_LOCKED), [lease.key.hash]);
    assert.equal((await hashes(KeyState.KEY_STATE_AVAILABLE)).length, PAGED.length - 1);
  });

  it("a bad token is INVALID_ARGUMENT", async () => {
    const error = await client.listPage({ pageToken: "not-a-token" }).then(
      () => assert.fail("the call succeeded"),
      (e: unknown) => e,
    );
    assert.ok(error instanceof KeysvcError);
    assert.equal(error.codeName, status[status.INVALID_ARGUMENT]);
    assert.equal(error.reason, "INVALID_ARGUMENT");
  });
});
