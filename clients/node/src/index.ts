/**
 * @keysvc/client: a typed promise client for keysvc.v1.KeyService on @grpc/grpc-js.
 *
 *     const keys = new KeysvcClient("127.0.0.1:50051");
 *     const lease = await keys.get("gpt-4o"); // lease.secret, lease.key.hash
 */
export {
  DEFAULT_TARGET,
  DEFAULT_TIMEOUT_MS,
  KeysvcClient,
  rateLimitHeaders,
  type CallOpts,
  type HeadersLike,
  type KeysvcClientOptions,
  type Lease,
  type ListPageRequest,
  type Outcome,
  type OutcomeReply,
  type TlsOptions,
} from "./client";
export { KeysvcError, type ErrorInfo } from "./errors";
export {
  DisableReason,
  KeyState,
  OutcomeAction,
  type Key,
  type ListResponse,
} from "./gen/keysvc/v1/keysvc";
export { status } from "@grpc/grpc-js";
