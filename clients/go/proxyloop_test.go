package keysvc_test

import (
	"context"
	"errors"
	"net/http"
	"os"
	"strings"
	"testing"
	"time"

	keysvc "keysvc/clients/go"
)

// README example: the lines between the markers appear verbatim in clients/README.md.
// begin example
func complete(ctx context.Context, keys *keysvc.Client, model string, upstream func(secret string) *http.Response) (*http.Response, error) {
	for try := 0; try < 3; try++ {
		lease, err := keys.Get(ctx, model) // lease.Secret goes upstream, lease.Key.Hash comes back
		if err != nil {
			return nil, err
		}
		resp := upstream(lease.Secret)
		_ = keys.UpdateRateLimits(ctx, lease.Key.Hash, resp.Header)
		if resp.StatusCode != http.StatusTooManyRequests {
			return resp, nil
		}
		_ = keys.MarkRateLimited(ctx, lease.Key.Hash, model) // and retry with the next key
	}
	return nil, errors.New("every key tried was rate limited")
}

// end example

func TestProxyLoopRetriesA429OnAnotherKey(t *testing.T) {
	client := newClient(t, startServer(t))
	var used []string
	upstream := func(secret string) *http.Response {
		used = append(used, secret)
		resp := &http.Response{StatusCode: http.StatusOK, Header: http.Header{}}
		if len(used) == 1 {
			resp.StatusCode = http.StatusTooManyRequests
			resp.Header.Set("x-ratelimit-reset-requests", "3s")
		}
		return resp
	}
	resp, err := complete(context.Background(), client, "gpt-4o", upstream)
	if err != nil || resp.StatusCode != http.StatusOK {
		t.Fatalf("complete: %v %v", resp, err)
	}
	if len(used) != 2 || used[0] == used[1] {
		t.Fatalf("want a retry on another key, used %d keys", len(used))
	}
	keys, err := client.List(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	for _, k := range keys {
		if k.GetHash() == keyHash(used[0]) {
			if locked := k.GetRateLimitedUntil().AsTime().Sub(k.GetRateLimitedAt().AsTime()); locked < 3*time.Second {
				t.Fatalf("the 429 locked the key for %v, want its 3s reset", locked)
			}
		}
	}
}

func TestReadmeShowsTheExampleAsItIs(t *testing.T) {
	source, err := os.ReadFile("proxyloop_test.go")
	if err != nil {
		t.Fatal(err)
	}
	_, rest, _ := strings.Cut(string(source), "// begin example\n")
	example, _, _ := strings.Cut(rest, "\n// end example")
	example = strings.TrimSpace(example) + "\n"
	if lines := strings.Count(example, "\n"); lines > 15 {
		t.Fatalf("the example has %d lines, want at most 15", lines)
	}
	readme, err := os.ReadFile("../README.md")
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(string(readme), "```go\n"+example+"```") {
		t.Fatal("clients/README.md does not show the Go example as it is in proxyloop_test.go")
	}
}
