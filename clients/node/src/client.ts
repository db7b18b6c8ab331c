import {
  credentials,
  Metadata,
  status,
  type CallOptions,
  type ClientOptions,
  type ClientUnaryCall,
  type ServiceError,
} from "@grpc/grpc-js";

import { KeysvcError } from "./errors";
import {
  DisableReason,
  KeyServiceClient,
  type GetRequest,
  KeyState,
  type Key,
  type ListResponse,
  type OutcomeAction,
} from "./gen/keysvc/v1/keysvc";

/** Where `keysvc serve` listens by default. */
export const DEFAULT_TARGET = "127.0.0.1:50051";
/** Milliseconds a call may take unless the client or the call says otherwise. */
export const DEFAULT_TIMEOUT_MS = 5000;

/** TLS for the channel: PEM buffers. Without it the channel is plaintext. */
export interface TlsOptions {
  /** CA certificates to trust; omitted: the system's roots. */
  rootCerts?: Buffer;
  /** Client certificate chain and private key, for mutual TLS (both or neither). */
  certChain?: Buffer;
  privateKey?: Buffer;
  /** Name to check the server's certificate against when it differs from the target host. */
  serverName?: string;
}

export interface KeysvcClientOptions {
  /** Default deadline of each call in milliseconds; null for none. Default 5000. */
  timeoutMs?: number | null;
  tls?: TlsOptions;
  /** Sent as `authorization: Bearer <token>` with every call. */
  token?: string;
  /** Extra grpc-js channel options. */
  channelOptions?: ClientOptions;
}

/** Per-call options. */
export interface CallOpts {
  /** This call's deadline in milliseconds (null: none), instead of the client's. */
  timeoutMs?: number | null;
}

/** One List page to ask for; every field may be left out. */
export interface ListPageRequest {
  /** Most keys to return; 0 or omitted: the server's maximum. */
  pageSize?: number;
  /** `nextPageToken` of the previous page; omitted for the first page. */
  pageToken?: string;
  /** Only keys in this state; omitted: every key. */
  state?: KeyState;
}

/** A handed-out key: `secret` goes upstream, `key.hash` names it in later calls. */
export interface Lease {
  secret: string;
  key: Key;
}

/** Response headers as fetch (`Headers`) or node:http (`IncomingHttpHeaders`) give them. */
export type HeadersLike =
  | { forEach(callback: (value: string, name: string) => void): void }
  | Record<string, string | string[] | undefined>;

/** One upstream answer, as `reportOutcome` sends it. */
export interface Outcome {
  /** The key the request was sent with. */
  hash: string;
  /** The request's model. */
  model: string;
  /** The upstream HTTP status. */
  status: number;
  /** The upstream answer's headers; only `x-ratelimit-*` are sent. */
  headers?: HeadersLike;
  /** The `error` object of an OpenAI error body (type, code, message). */
  error?: { type?: string | null; code?: string | null; message?: string | null };
  /** `usage.prompt_tokens` and `usage.completion_tokens` of a successful answer. */
  promptTokens?: number;
  completionTokens?: number;
}

/** What keysvc made of an upstream answer. */
export interface OutcomeReply {
  /** DONE, RETRY_WITH_ANOTHER_KEY or RETURN_ERROR. */
  action: OutcomeAction;
  /** The key as it now stands. */
  key: Key;
  /** A short explanation for logs; not for branching. */
  reason: string;
}

type Unary<Req, Resp> = (
  request: Req,
  metadata: Metadata,
  options: Partial<CallOptions>,
  callback: (error: ServiceError | null, response: Resp) => void,
) => ClientUnaryCall;

/** A promise client for keysvc.v1.KeyService; every failed call rejects with KeysvcError. */
export class KeysvcClient {
  readonly target: string;
  private readonly stub: KeyServiceClient;
  private readonly timeoutMs: number | null;
  private readonly token: string | undefined;

  constructor(target: string = DEFAULT_TARGET, options: KeysvcClientOptions = {}) {
    if (options.token !== undefined && (options.token === "" || /[\r\n]/.test(options.token))) {
      throw new TypeError("token must be a non-empty single line");
    }
    const tls = options.tls;
    const creds = tls
      ? credentials.createSsl(tls.rootCerts ?? null, tls.privateKey ?? null, tls.certChain ?? null)
      : credentials.createInsecure();
    const channelOptions: ClientOptions = { ...options.channelOptions };
    if (tls?.serverName) channelOptions["grpc.ssl_target_name_override"] = tls.serverName;
    this.target = target;
    this.stub = new KeyServiceClient(target, creds, channelOptions);
    this.timeoutMs = options.timeoutMs ?? DEFAULT_TIMEOUT_MS;
    this.token = options.token;
  }

  close(): void {
    this.stub.close();
  }

  /**
   * A key for `model`. With `opts.maxWaitMs` (at most 60000), when every key is locked
   * the server waits that long for one to unlock; the default deadline grows by as much.
   * If none unlocks in time: KeysvcError with reason KEYS_BUSY (metadata retry_after).
   */
  async get(model: string, opts?: CallOpts & { maxWaitMs?: number }): Promise<Lease> {
    const maxWaitMs = opts?.maxWaitMs;
    let request: GetRequest = { model, maxWait: undefined };
    let callOpts = opts;
    if (maxWaitMs !== undefined) {
      const nanos = Math.round(maxWaitMs * 1e6);
      const seconds = Math.trunc(nanos / 1e9);
      request = { model, maxWait: { seconds, nanos: nanos - seconds * 1e9 } };
      if (opts?.timeoutMs === undefined && this.timeoutMs !== null) {
        callOpts = { ...opts, timeoutMs: this.timeoutMs + maxWaitMs };
      }
    }
    const response = await this.call(this.stub.get, request, callOpts);
    if (!response.key) throw new KeysvcError(status.INTERNAL, "the response carries no key");
    return { secret: response.secret, key: response.key };
  }

  /** Takes the key out of service; resolves to the key as it now stands. */
  async disable(
    hash: string,
    reason: DisableReason = DisableReason.DISABLE_REASON_UNSPECIFIED,
    opts?: CallOpts,
  ): Promise<Key> {
    const response = await this.call(this.stub.disable, { hash, reason }, opts);
    if (!response.key) throw new KeysvcError(status.INTERNAL, "the response carries no key");
    return response.key;
  }

  /** Reports that the upstream answered 429 for the key (for `model`, if given). */
  async markRateLimited(hash: string, model = "", opts?: CallOpts): Promise<void> {
    await this.call(this.stub.markRateLimited, { hash, model }, opts);
  }

  /**
   * Passes on an upstream answer's `x-ratelimit-*` headers; the others stay here. With
   * `opts.model` they apply to that model's family only; without, to every family.
   */
  async updateRateLimits(
    hash: string,
    headers: HeadersLike,
    opts?: CallOpts & { model?: string },
  ): Promise<void> {
    const request = { hash, headers: rateLimitHeaders(headers), model: opts?.model ?? "" };
    await this.call(this.stub.updateRateLimits, request, opts);
  }

  /** Milliseconds until a key for `model` is free; 0 when one is free now. */
  async getLockoutPeriod(model = "", opts?: CallOpts): Promise<number> {
    const { lockout } = await this.call(this.stub.getLockoutPeriod, { model }, opts);
    return lockout ? lockout.seconds * 1000 + lockout.nanos / 1e6 : 0;
  }

  /** Adds a finished request's tokens to the key's usage. */
  async incrementUsage(hash: string, model: string, tokens: number, opts?: CallOpts): Promise<void> {
    await this.call(this.stub.incrementUsage, { hash, model, tokens }, opts);
  }

  /** Applies one upstream answer to its key; `action` says what to do with the request. */
  async reportOutcome(outcome: Outcome, opts?: CallOpts): Promise<OutcomeReply> {
    const response = await this.call(
      this.stub.reportOutcome,
      {
        hash: outcome.hash,
        model: outcome.model,
        status: outcome.status,
        headers: outcome.headers ? rateLimitHeaders(outcome.headers) : {},
        errorType: outcome.error?.type ?? "",
        errorCode: outcome.error?.code ?? "",
        errorMessage: outcome.error?.message ?? "",
        promptTokens: outcome.promptTokens ?? 0,
        completionTokens: outcome.completionTokens ?? 0,
      },
      opts,
    );
    if (!response.key) throw new KeysvcError(status.INTERNAL, "the response carries no key");
    return { action: response.action, key: response.key, reason: response.reason };
  }

  /**
   * One page of keys (no secrets) in load order; pass its `nextPageToken` to get the next,
   * until it is empty. A page filtered by `state` may hold fewer keys than asked for, even none.
   */
  async listPage(request: ListPageRequest = {}, opts?: CallOpts): Promise<ListResponse> {
    return await this.call(
      this.stub.list,
      {
        pageSize: request.pageSize ?? 0,
        pageToken: request.pageToken ?? "",
        state: request.state ?? KeyState.KEY_STATE_UNSPECIFIED,
      },
      opts,
    );
  }

  /** Every key (in `state`, if given), fetched a page per call; `opts` apply to each call. */
  async *keys(state?: KeyState, opts?: CallOpts): AsyncGenerator<Key, void, undefined> {
    let pageToken = "";
    do {
      const page = await this.listPage({ pageToken, state }, opts);
      yield* page.keys;
      pageToken = page.nextPageToken;
    } while (pageToken !== "");
  }

  /** The public view of every key (in `state`, if given; no secrets), all pages of it. */
  async list(opts?: CallOpts, state?: KeyState): Promise<Key[]> {
    const keys: Key[] = [];
    for await (const key of this.keys(state, opts)) keys.push(key);
    return keys;
  }

  /** How many keys are not disabled. */
  async available(opts?: CallOpts): Promise<number> {
    return (await this.call(this.stub.available, {}, opts)).count;
  }

  /** Clears every key's disabled flags and has the checker look at them again. */
  async recheck(opts?: CallOpts): Promise<void> {
    await this.call(this.stub.recheck, {}, opts);
  }

  private call<Req, Resp>(method: Unary<Req, Resp>, request: Req, opts?: CallOpts): Promise<Resp> {
    const metadata = new Metadata();
    if (this.token !== undefined) metadata.set("authorization", `Bearer ${this.token}`);
    const timeoutMs = opts?.timeoutMs === undefined ? this.timeoutMs : opts.timeoutMs;
    const options: Partial<CallOptions> = timeoutMs === null ? {} : { deadline: Date.now() + timeoutMs };
    return new Promise((resolve, reject) => {
      method.call(this.stub, request, metadata, options, (error, response) => {
        if (error) reject(KeysvcError.from(error));
        else resolve(response);
      });
    });
  }
}

/** The `x-ratelimit-*` headers, names lower-cased, the first value of each. */
export function rateLimitHeaders(headers: HeadersLike): Record<string, string> {
  const out: Record<string, string> = {};
  const keep = (name: string, value: string | string[] | undefined) => {
    const lower = name.toLowerCase();
    const first = Array.isArray(value) ? value[0] : value;
    if (lower.startsWith("x-ratelimit-") && first !== undefined) out[lower] ??= first;
  };
  if (typeof headers.forEach === "function") {
    (headers as { forEach(cb: (value: string, name: string) => void): void }).forEach(
      (value, name) => keep(name, value),
    );
  } else {
    for (const [name, value] of Object.entries(headers)) keep(name, value as string | string[] | undefined);
  }
  return out;
}
