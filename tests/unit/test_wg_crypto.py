"""Known-answer tests for WireGuard's primitives, with the vectors' sources beside them."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from wgmesh.wireguard import crypto as c

pytestmark = pytest.mark.unit

SUNSCREEN = (b"Ladies and Gentlemen of the class of '99: If I could offer you only one tip "
             b"for the future, sunscreen would be it.")
AAD = bytes.fromhex("50515253c0c1c2c3c4c5c6c7")
KEY = bytes(range(0x80, 0xA0))


def test_chacha20poly1305_rfc8439_section_2_8_2() -> None:
    # RFC 8439, section 2.8.2 "Example and Test Vector for AEAD_CHACHA20_POLY1305"
    nonce = bytes.fromhex("070000004041424344454647")
    expected = bytes.fromhex(
        "d31a8d34648e60db7b86afbc53ef7ec2a4aded51296e08fea9e2b5a736ee62d6"
        "3dbea45e8ca9671282fafb69da92728b1a71de0a9e060b2905d6a5b67ecd3b36"
        "92ddbd7f2d778b8c9803aee328091b58fab324e4fad675945585808b4831d7bc"
        "3ff4def08e4b7a9de576d26586cec64b6116"
        "1ae10b594f09e26a7e902ecbd0600691")  # tag
    assert ChaCha20Poly1305(KEY).encrypt(nonce, SUNSCREEN, AAD) == expected
    # WireGuard's nonce is 4 zero bytes then the 64-bit little-endian counter.
    counter_nonce = bytes(4) + (0x0807060504030201).to_bytes(8, "little")
    assert c.aead_encrypt(KEY, 0x0807060504030201, SUNSCREEN, AAD) == \
        ChaCha20Poly1305(KEY).encrypt(counter_nonce, SUNSCREEN, AAD)
    assert c.aead_decrypt(KEY, 7, c.aead_encrypt(KEY, 7, b"x", b"ad"), b"ad") == b"x"
    with pytest.raises(c.InvalidTag):
        c.aead_decrypt(KEY, 8, c.aead_encrypt(KEY, 7, b"x", b"ad"), b"ad")


def test_blake2s_rfc7693_appendix_b() -> None:
    # RFC 7693, Appendix B: BLAKE2s-256("abc")
    assert c.hash_(b"abc") == bytes.fromhex(
        "508c5e8c327c14e2e1a72ba34eeb452f37458b209ed63a294d999b4c86675982")
    assert c.hash_(b"a", b"bc") == c.hash_(b"abc")


def test_x25519_rfc7748_section_5_2() -> None:
    # RFC 7748, section 5.2, first test vector
    scalar = bytes.fromhex("a546e36bf0527c9d3b16154b82465edd62144c0ac1fc5a18506a2244ba449ac4")
    u = bytes.fromhex("e6db6867583030db3594c1a424b15f7c726624ec26b3353b10a903a6d0ab1c4c")
    assert c.dh(scalar, u) == bytes.fromhex(
        "c3da55379de9c6908e94ea4df28d084f32eccf03491c71f754b4075577a28552")


def test_x25519_rfc7748_section_6_1() -> None:
    # RFC 7748, section 6.1 (Diffie-Hellman with Alice and Bob)
    a = bytes.fromhex("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a")
    b = bytes.fromhex("5dab087e624a8a4b79e17f8b83800ee66f3bb1292618b6fd1c2f8b27ff88e0eb")
    a_pub = bytes.fromhex("8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a")
    b_pub = bytes.fromhex("de9edb7d7b7dc1b4d35b61c2ece435373f8343c85b78674dadfc7e146f882b4f")
    shared = bytes.fromhex("4a5d9d5ba4ce2de1728e3bf480350f25e07e21c947d19e3376f09b3c1e161742")
    assert c.dh_public(a) == a_pub
    assert c.dh_public(b) == b_pub
    assert c.dh(a, b_pub) == c.dh(b, a_pub) == shared


def test_x25519_low_order_point_refused() -> None:
    # RFC 7748 section 6.1: an all-zero output must be checked for; WireGuard rejects it.
    with pytest.raises(ValueError):
        c.dh(c.dh_generate(), bytes(32))


def test_xchacha20poly1305_draft_irtf_cfrg_xchacha_03_a_3_1() -> None:
    # draft-irtf-cfrg-xchacha-03, Appendix A.3.1 (AEAD_XChaCha20_Poly1305 test vector)
    nonce = bytes.fromhex("404142434445464748494a4b4c4d4e4f5051525354555657")
    expected = bytes.fromhex(
        "bd6d179d3e83d43b9576579493c0e939572a1700252bfaccbed2902c21396cbb"
        "731c7f1b0b4aa6440bf3a82f4eda7e39ae64c6708c54c216cb96b72e1213b452"
        "2f8c9ba40db5d945b11b69b982c1bb9e3f3fac2bc369488f76b2383565d3fff9"
        "21f9664c97637da9768812f615c68b13b52e"
        "c0875924c1c7987947deafd8780acf49")  # tag
    assert c.xaead_encrypt(KEY, nonce, SUNSCREEN, AAD) == expected
    assert c.xaead_decrypt(KEY, nonce, expected, AAD) == SUNSCREEN
    with pytest.raises(c.InvalidTag):
        c.xaead_decrypt(KEY, nonce, expected[:-1] + b"\x00", AAD)


def test_hmac_is_rfc2104_over_blake2s_and_kdf_chains() -> None:
    # The whitepaper's HMAC is RFC 2104 with BLAKE2s (block 64), not keyed BLAKE2s.
    import hashlib
    key, msg = b"k" * 32, b"message"
    ipad = bytes(b ^ 0x36 for b in key.ljust(64, b"\0"))
    opad = bytes(b ^ 0x5C for b in key.ljust(64, b"\0"))
    inner = hashlib.blake2s(ipad + msg).digest()
    assert c.hmac(key, msg) == hashlib.blake2s(opad + inner).digest()
    t0 = c.hmac(key, msg)
    t1 = c.hmac(t0, b"\x01")
    t2 = c.hmac(t0, t1 + b"\x02")
    t3 = c.hmac(t0, t2 + b"\x03")
    assert c.kdf(key, msg, 3) == (t1, t2, t3)
    assert c.kdf(key, msg, 1) == (t1,)


def test_tai64n_is_big_endian_and_grows() -> None:
    ts = c.tai64n(1_700_000_000.5)
    assert len(ts) == 12
    assert int.from_bytes(ts[:8], "big") == 0x400000000000000A + 1_700_000_000
    assert int.from_bytes(ts[8:], "big") == 500_000_000
    assert c.tai64n(1_700_000_001.0) > ts


def test_mac_is_keyed_blake2s_128() -> None:
    import hashlib
    assert c.mac(b"k" * 32, b"x") == hashlib.blake2s(b"x", key=b"k" * 32, digest_size=16).digest()
