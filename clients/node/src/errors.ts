import { BinaryReader } from "@bufbuild/protobuf/wire";
import { status, type ServiceError } from "@grpc/grpc-js";

const ERROR_INFO_TYPE = "type.googleapis.com/google.rpc.ErrorInfo";

/** What keysvc puts in a google.rpc.ErrorInfo. */
export interface ErrorInfo {
  reason: string;
  domain: string;
  metadata: Record<string, string>;
}

/**
 * A failed keysvc call. Branch on `code` and `reason`, not on the message.
 *
 * `code` is the gRPC status (DEADLINE_EXCEEDED and UNAVAILABLE come from the transport);
 * `reason` is the google.rpc.ErrorInfo reason keysvc attached (KEY_NOT_FOUND,
 * NO_KEYS_FOR_FAMILY, FAMILY_DISALLOWED, INVALID_ARGUMENT, ...), undefined when none.
 */
export class KeysvcError extends Error {
  readonly code: status;
  readonly reason: string | undefined;
  readonly domain: string | undefined;
  readonly metadata: Record<string, string>;
  readonly details: string;

  constructor(code: status, details: string, info?: ErrorInfo) {
    super(`${status[code]}: ${details}${info ? ` [${info.reason}]` : ""}`);
    this.name = "KeysvcError";
    this.code = code;
    this.details = details;
    this.reason = info?.reason;
    this.domain = info?.domain;
    this.metadata = info?.metadata ?? {};
  }

  /** The name of the code, e.g. "NOT_FOUND". */
  get codeName(): string {
    return status[this.code];
  }

  /** Wraps a grpc-js error, reading the ErrorInfo from the grpc-status-details-bin trailer. */
  static from(error: ServiceError): KeysvcError {
    let info: ErrorInfo | undefined;
    for (const value of error.metadata?.get("grpc-status-details-bin") ?? []) {
      if (typeof value !== "string") info ??= errorInfoFromStatus(value);
    }
    return new KeysvcError(error.code, error.details, info);
  }
}

// google.rpc.Status, google.protobuf.Any and google.rpc.ErrorInfo are three small messages;
// reading their few fields here spares a second generated copy of googleapis' protos.
function errorInfoFromStatus(bytes: Uint8Array): ErrorInfo | undefined {
  for (const any of fields(bytes, 3)) {
    const [typeUrl] = fields(any, 1);
    const [value] = fields(any, 2);
    if (typeUrl && new TextDecoder().decode(typeUrl) === ERROR_INFO_TYPE) {
      return errorInfo(value ?? new Uint8Array());
    }
  }
  return undefined;
}

function errorInfo(bytes: Uint8Array): ErrorInfo {
  const text = (b: Uint8Array | undefined) => (b ? new TextDecoder().decode(b) : "");
  const metadata: Record<string, string> = {};
  for (const entry of fields(bytes, 3)) {
    metadata[text(fields(entry, 1)[0])] = text(fields(entry, 2)[0]);
  }
  return { reason: text(fields(bytes, 1)[0]), domain: text(fields(bytes, 2)[0]), metadata };
}

/** The length-delimited values of field `number` in a message. */
function fields(bytes: Uint8Array, number: number): Uint8Array[] {
  const reader = new BinaryReader(bytes);
  const found: Uint8Array[] = [];
  while (reader.pos < reader.len) {
    const [field, wireType] = reader.tag();
    if (field === number && wireType === 2) found.push(reader.bytes());
    else reader.skip(wireType);
  }
  return found;
}
