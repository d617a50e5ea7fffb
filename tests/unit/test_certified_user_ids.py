"""Only user ids we certified count: a peer cannot claim another site's address by adding a uid."""

from __future__ import annotations

from collections.abc import Callable

from dicommail.crypto.gpg import Keyring
from dicommail.crypto.keys import certify, export_key, find_key, generate, import_keys


def test_uid_added_after_certification_is_not_certified(new_keyring: Callable[[], Keyring]) -> None:
    ours, peer = new_keyring(), new_keyring()
    generate(ours, "Our site (TEST ONLY)", "us@ours.test", algo="ed25519", expires="never")
    key = generate(peer, "Peer (TEST ONLY)", "peer@peer.test", algo="ed25519", expires="never")
    import_keys(ours, export_key(peer, key.fingerprint).encode())
    certify(ours, key.fingerprint)
    assert find_key(ours, key.fingerprint).certified_user_ids == ("Peer (TEST ONLY) <peer@peer.test>",)

    result = peer.run(["--quick-add-uid", key.fingerprint, "Someone else <victim@other.test>"])
    assert result.returncode == 0, result.log
    import_keys(ours, export_key(peer, key.fingerprint).encode())
    updated = find_key(ours, key.fingerprint)
    assert "Someone else <victim@other.test>" in updated.user_ids
    assert updated.certified_user_ids == ("Peer (TEST ONLY) <peer@peer.test>",)
