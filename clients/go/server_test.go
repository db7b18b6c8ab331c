package keysvc_test

import (
	"bufio"
	"crypto/sha256"
	"encoding/hex"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"syscall"
	"testing"
	"time"
)

// secrets are the known keys every test server starts with.
var secrets = []string{"sk-client-test-1", "sk-client-test-2", "sk-client-test-3"}

var serving = regexp.MustCompile(`keysvc\.server: serving address=(\S+)`)

func keyHash(secret string) string {
	sum := sha256.Sum256([]byte(secret))
	return "oai-" + hex.EncodeToString(sum[:])[:8]
}

// startServer runs a fresh `keysvc serve --port 0` (KEYSVC_BIN, default the repo's .venv)
// and returns its address; the test's cleanup stops it with SIGTERM and wants exit 0.
func startServer(t *testing.T) string {
	t.Helper()
	return startServerWith(t, secrets)
}

// startServerWith is startServer with other keys and extra environment variables.
func startServerWith(t *testing.T, keys []string, env ...string) string {
	t.Helper()
	bin := os.Getenv("KEYSVC_BIN")
	if bin == "" {
		bin, _ = filepath.Abs("../../.venv/bin/keysvc")
	}
	cmd := exec.Command(bin, "serve", "--host", "127.0.0.1", "--port", "0")
	cmd.Env = append(os.Environ(), "OPENAI_KEY="+strings.Join(keys, ","), "CHECK_KEYS=false")
	cmd.Env = append(cmd.Env, env...)
	stderr, err := cmd.StderrPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatalf("start %s: %v", bin, err)
	}
	found := make(chan string, 1)
	go func() {
		lines := bufio.NewScanner(stderr)
		sent := false
		for lines.Scan() { // keep draining so the server never blocks on a full pipe
			if m := serving.FindStringSubmatch(lines.Text()); m != nil && !sent {
				found <- m[1]
				sent = true
			}
		}
		if !sent {
			close(found)
		}
	}()
	var address string
	select {
	case address = <-found:
	case <-time.After(30 * time.Second):
	}
	if address == "" {
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
		t.Fatal("keysvc did not start")
	}
	t.Cleanup(func() {
		_ = cmd.Process.Signal(syscall.SIGTERM)
		if err := cmd.Wait(); err != nil {
			t.Errorf("keysvc exited with %v", err)
		}
	})
	return address
}
