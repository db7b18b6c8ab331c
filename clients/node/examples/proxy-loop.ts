import { KeysvcClient } from "../src";

// README example: the lines between the markers appear verbatim in clients/README.md.
// begin example
export async function complete(keys: KeysvcClient, model: string, upstream: (secret: string) => Promise<Response>) {
  for (let attempt = 0; attempt < 3; attempt++) {
    const lease = await keys.get(model); // lease.secret goes upstream, lease.key.hash comes back
    const response = await upstream(lease.secret);
    await keys.updateRateLimits(lease.key.hash, response.headers);
    if (response.status !== 429) return response;
    await keys.markRateLimited(lease.key.hash, model); // and retry with the next key
  }
  throw new Error(`every key tried was rate limited for ${model}`);
}
// end example
