from collections.abc import Callable, Mapping

from keysvc_client import KeysvcClient

Upstream = Callable[[str], tuple[int, Mapping[str, str], bytes]]  # secret -> status, headers, body

def complete(keys: KeysvcClient, model: str, call_upstream: Upstream, tries: int = 3) -> bytes:
    for _ in range(tries):
        lease = keys.get(model)  # lease.secret goes upstream, lease.key.hash comes back
        status, headers, body = call_upstream(lease.secret)
        keys.update_rate_limits(lease.key.hash, headers)
        if status != 429:
            return body
        keys.mark_rate_limited(lease.key.hash, model)  # and retry with the next key
    raise RuntimeError(f"every key tried was rate limited for {model}")
