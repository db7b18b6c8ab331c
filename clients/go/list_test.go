package keysvc_test

import (
	"context"
	"fmt"
	"slices"
	"testing"

	"google.golang.org/grpc/codes"

	"keysvc/clients/go/keysvcv1"
)

// pagedServer serves seven keys with a server maximum page size of 2 (four pages).
func pagedServer(t *testing.T) (string, []string) {
	t.Helper()
	var keys []string
	for n := range 7 {
		keys = append(keys, fmt.Sprintf("sk-client-page-%d", n))
	}
	return startServerWith(t, keys, "KEYSVC_LIST_MAX_PAGE_SIZE=2"), keys
}

func hashes(keys []*keysvcv1.Key) []string {
	var out []string
	for _, key := range keys {
		out = append(out, key.GetHash())
	}
	return out
}

func TestListPagesThroughEveryKey(t *testing.T) {
	address, keys := pagedServer(t)
	client := newClient(t, address)
	ctx := context.Background()
	var want []string
	for _, secret := range keys {
		want = append(want, keyHash(secret))
	}
	all, err := client.List(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(hashes(all), want) {
		t.Fatalf("List: %v, want %v", hashes(all), want)
	}
	first, err := client.ListPage(ctx, &keysvcv1.ListRequest{})
	if err != nil {
		t.Fatal(err)
	}
	if len(first.GetKeys()) != 2 || first.GetNextPageToken() == "" {
		t.Fatalf("first page: %d keys, token %q", len(first.GetKeys()), first.GetNextPageToken())
	}
	second, err := client.ListPage(ctx, &keysvcv1.ListRequest{PageToken: first.GetNextPageToken(), PageSize: 1})
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(hashes(second.GetKeys()), want[2:3]) {
		t.Fatalf("second page: %v", hashes(second.GetKeys()))
	}
}

func TestKeysFiltersByState(t *testing.T) {
	address, keys := pagedServer(t)
	client := newClient(t, address)
	ctx := context.Background()
	if _, err := client.Disable(ctx, keyHash(keys[5]), keysvcv1.DisableReason_DISABLE_REASON_MANUAL); err != nil {
		t.Fatal(err)
	}
	lease := mustGet(t, client, "gpt-4o")
	collect := func(state keysvcv1.KeyState) []string {
		var out []string
		for key, err := range client.Keys(ctx, state) {
			if err != nil {
				t.Fatal(err)
			}
			out = append(out, key.GetHash())
		}
		return out
	}
	if got := collect(keysvcv1.KeyState_KEY_STATE_DISABLED); !slices.Equal(got, []string{keyHash(keys[5])}) {
		t.Fatalf("disabled: %v", got)
	}
	if got := collect(keysvcv1.KeyState_KEY_STATE_LOCKED); !slices.Equal(got, []string{lease.GetKey().GetHash()}) {
		t.Fatalf("locked: %v", got)
	}
	if got := collect(keysvcv1.KeyState_KEY_STATE_AVAILABLE); len(got) != len(keys)-1 {
		t.Fatalf("available: %v", got)
	}
	for _, err := range client.Keys(ctx, keysvcv1.KeyState_KEY_STATE_ACTIVE) {
		if err != nil {
			t.Fatal(err)
		}
		break // stopping early is allowed
	}
}

func TestListPageRejectsABadToken(t *testing.T) {
	address, _ := pagedServer(t)
	client := newClient(t, address)
	_, err := client.ListPage(context.Background(), &keysvcv1.ListRequest{PageToken: "not-a-token"})
	wantError(t, err, codes.InvalidArgument, "INVALID_ARGUMENT")
	_, err = client.ListPage(context.Background(), &keysvcv1.ListRequest{PageSize: -1})
	wantError(t, err, codes.InvalidArgument, "INVALID_ARGUMENT")
}
