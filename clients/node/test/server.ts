import { spawn } from "node:child_process";
import { createHash } from "node:crypto";
import { resolve } from "node:path";
import { createInterface } from "node:readline";

/** The known keys every test server starts with. */
export const SECRETS = ["sk-client-test-1", "sk-client-test-2", "sk-client-test-3"];

export function keyHash(secret: string): string {
  return "oai-" + createHash("sha256").update(secret).digest("hex").slice(0, 8);
}

export interface LiveServer {
  target: string;
  /** SIGTERM, then resolves to the exit code. */
  stop(): Promise<number | null>;
}

/** A fresh `keysvc serve --port 0` (KEYSVC_BIN, default the repo's .venv) on loopback. */
export async function startServer(
  secrets: readonly string[] = SECRETS,
  env: Record<string, string> = {},
): Promise<LiveServer> {
  const bin = process.env.KEYSVC_BIN ?? resolve(__dirname, "../../../../.venv/bin/keysvc");
  const child = spawn(bin, ["serve", "--host", "127.0.0.1", "--port", "0"], {
    env: { ...process.env, OPENAI_KEY: secrets.join(","), CHECK_KEYS: "false", ...env },
    stdio: ["ignore", "ignore", "pipe"],
  });
  const exited = new Promise<number | null>((done) => child.on("exit", (code) => done(code)));
  const target = await new Promise<string>((found, failed) => {
    const seen: string[] = [];
    const timer = setTimeout(() => failed(new Error("keysvc did not start in 30 s")), 30_000);
    createInterface({ input: child.stderr! }).on("line", (line) => {
      seen.push(line);
      const match = /keysvc\.server: serving address=(\S+)/.exec(line);
      if (match) {
        clearTimeout(timer);
        found(match[1]!);
      }
    });
    child.on("error", failed);
    void exited.then(() => failed(new Error(`keysvc exited before serving:\n${seen.join("\n")}`)));
  });
  return {
    target,
    stop: () => {
      child.kill("SIGTERM");
      return exited;
    },
  };
}
