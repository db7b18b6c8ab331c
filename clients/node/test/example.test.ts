import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { resolve } from "node:path";
import { test } from "node:test";

import { complete } from "../examples/proxy-loop";
import { KeysvcClient } from "../src";
import { keyHash, startServer } from "./server";

const root = resolve(__dirname, "../..");

test("the README shows the proxy-loop example as it is", () => {
  const source = readFileSync(resolve(root, "examples/proxy-loop.ts"), "utf8");
  const example = source.split("// begin example\n")[1]!.split("// end example")[0]!;
  assert.ok(example.split("\n").length - 1 <= 15, "the example is longer than 15 lines");
  const readme = readFileSync(resolve(root, "../README.md"), "utf8");
  assert.ok(readme.includes("```ts\n" + example + "```"), "clients/README.md lacks the Node example");
});

test("the proxy loop retries a 429 on another key", async () => {
  const server = await startServer();
  const keys = new KeysvcClient(server.target);
  try {
    const used: string[] = [];
    const upstream = async (secret: string) => {
      used.push(secret);
      return used.length === 1
        ? new Response("slow down", { status: 429, headers: { "x-ratelimit-reset-requests": "3s" } })
        : new Response("answer", { status: 200 });
    };
    const response = await complete(keys, "gpt-4o", upstream);
    assert.equal(await response.text(), "answer");
    assert.equal(used.length, 2);
    assert.notEqual(used[0], used[1]);
    const limited = (await keys.list()).find((k) => k.hash === keyHash(used[0]!))!;
    const lockedMs = limited.rateLimitedUntil!.getTime() - limited.rateLimitedAt!.getTime();
    assert.ok(lockedMs >= 3000, `the 429 locked the key for ${lockedMs} ms, want its 3 s reset`);
  } finally {
    keys.close();
    assert.equal(await server.stop(), 0);
  }
});
