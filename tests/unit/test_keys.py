import hashlib

from keysvc.keys import hash_key, parse_key_list


def test_hash_is_oai_prefix_and_eight_hex_digits_of_sha256() -> None:
    assert hash_key("sk-abc") == "oai-" + hashlib.sha256(b"sk-abc").hexdigest()[:8]


def test_org_clone_hash_covers_key_and_org() -> None:
    assert hash_key("sk-abc", "org-1") == "oai-" + hashlib.sha256(b"sk-abcorg-1").hexdigest()[:8]
    assert hash_key("sk-abc", "org-1") != hash_key("sk-abc")


def test_key_list_is_trimmed_and_deduplicated_in_order() -> None:
    assert parse_key_list(" sk-b , sk-a,sk-b,, ,sk-c ") == ["sk-b", "sk-a", "sk-c"]
    assert parse_key_list("") == []
    assert parse_key_list(" , ") == []
