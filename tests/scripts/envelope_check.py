#!/usr/bin/env python3
"""An independent decryptor for kms envelope formats v1 and v2, written only
from the README sections "Envelope format, version 1" and "Envelope format,
version 2", with the `cryptography` package (HKDF-SHA256, AES-GCM). It shares
no code with the Rust implementation.

Usage:
  envelope_check.py decrypt --data-key HEX --in FILE [--out FILE] [--context K=V ...]
      Decrypts FILE given the plaintext data key; writes the plaintext to --out
      (default: stdout) and prints nothing else. Exit 0 on success, 1 if the
      envelope is invalid (tampered, truncated, wrong key or context).
  envelope_check.py golden DIR
      Checks every vector of DIR/vectors.json: valid ones decrypt to the
      expected plaintext digest, invalid ones are refused; a valid vector with
      "body_of" must have exactly that file's body (the bytes after the header)
      and the "wrapped_data_key" given.
"""
import argparse
import hashlib
import json
import os
import struct
import sys

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

MAGIC = b"KMSE"
TAG_LEN = 16
LABELS = {1: b"kms-envelope-v1 message key", 2: b"kms-envelope-v2 message key"}
MAX_CHUNKS = 1 << 32


class Invalid(Exception):
    pass


def encode_context(context):
    """u32 BE count, then per entry sorted by UTF-8 key bytes: u32 BE len ‖ key, u32 BE len ‖ value."""
    items = sorted((k.encode(), v.encode()) for k, v in context.items())
    out = struct.pack(">I", len(items))
    for k, v in items:
        out += struct.pack(">I", len(k)) + k + struct.pack(">I", len(v)) + v
    return out


def read_exact(f, n):
    data = f.read(n)
    if len(data) != n:
        raise Invalid("truncated header")
    return data


def read_header(f):
    """Returns (version, header, authenticated bytes, S, message id, context bytes, wrapped key).

    v1 authenticates the full header; v2 the bound header: the header without
    the W field and the wrapped data key (magic ‖ version ‖ suite ‖ S ‖
    message id ‖ C ‖ context)."""
    prefix = read_exact(f, 44)
    if prefix[0:4] != MAGIC or prefix[4] not in LABELS or prefix[5] != 1:
        raise Invalid("bad magic, version or suite")
    version = prefix[4]
    (chunk_size,) = struct.unpack(">I", prefix[6:10])
    if not 1 <= chunk_size <= 16 * 1024 * 1024:
        raise Invalid("bad chunk size")
    message_id = prefix[10:42]
    (w,) = struct.unpack(">H", prefix[42:44])
    if not 1 <= w <= 4096:
        raise Invalid("bad wrapped key length")
    wrapped = read_exact(f, w)
    c_field = read_exact(f, 4)
    (c,) = struct.unpack(">I", c_field)
    if not 4 <= c <= 65536:
        raise Invalid("bad context length")
    context = read_exact(f, c)
    header = prefix + wrapped + c_field + context
    if version == 1:
        authenticated = header
    else:
        authenticated = prefix[0:42] + c_field + context
    return version, header, authenticated, chunk_size, message_id, context, wrapped


def read_up_to(f, n):
    buf = b""
    while len(buf) < n:
        part = f.read(n - len(buf))
        if not part:
            break
        buf += part
    return buf


def decrypt(f, out, data_key, context):
    version, _, authenticated, chunk_size, message_id, encoded_context, _ = read_header(f)
    if encoded_context != encode_context(context):
        raise Invalid("context differs")
    message_key = HKDF(
        algorithm=hashes.SHA256(), length=32, salt=message_id, info=LABELS[version] + authenticated
    ).derive(data_key)
    aead = AESGCM(message_key)
    aad = hashlib.sha256(authenticated).digest()
    index = 0
    total = 0
    while True:
        chunk = read_up_to(f, chunk_size + TAG_LEN)
        last = len(chunk) < chunk_size + TAG_LEN
        if len(chunk) < TAG_LEN or index >= (MAX_CHUNKS if last else MAX_CHUNKS - 1):
            raise Invalid("truncated or too many chunks")
        nonce = index.to_bytes(11, "big") + (b"\x01" if last else b"\x00")
        try:
            plaintext = aead.decrypt(nonce, chunk, aad)
        except InvalidTag:
            raise Invalid("tag check failed") from None
        out.write(plaintext)  # only after the tag verified
        total += len(plaintext)
        index += 1
        if last:
            break
    if f.read(1):
        raise Invalid("data after the final chunk")
    return total


def parse_context(pairs):
    context = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key or key in context:
            raise SystemExit(f"bad --context {pair!r}")
        context[key] = value
    return context


def check_golden(directory):
    with open(os.path.join(directory, "vectors.json")) as f:
        manifest = json.load(f)
    data_key = bytes.fromhex(manifest["data_key"])
    failures = 0
    for v in manifest["valid"]:
        sink = HashingSink()
        with open(os.path.join(directory, v["file"]), "rb") as f:
            try:
                n = decrypt(f, sink, data_key, v["context"])
            except Invalid as e:
                print(f"FAIL {v['name']}: {e}")
                failures += 1
                continue
        expected = hashlib.sha256(bytes(i % 251 for i in range(v["plaintext_len"]))).hexdigest()
        if n != v["plaintext_len"] or sink.hexdigest() != v["plaintext_sha256"] or expected != v["plaintext_sha256"]:
            print(f"FAIL {v['name']}: wrong plaintext")
            failures += 1
        elif "body_of" in v and not same_body(directory, v):
            print(f"FAIL {v['name']}: not a rewrap of {v['body_of']}")
            failures += 1
        else:
            print(f"ok valid {v['name']}")
    for v in manifest["invalid"]:
        with open(os.path.join(directory, v["file"]), "rb") as f:
            try:
                decrypt(f, HashingSink(), data_key, v["context"])
                print(f"FAIL {v['name']}: accepted")
                failures += 1
            except Invalid:
                print(f"ok invalid {v['name']}")
    return 1 if failures else 0


def split(path):
    """(wrapped data key, body) of the envelope at path."""
    with open(path, "rb") as f:
        _, _, _, _, _, _, wrapped = read_header(f)
        return wrapped, f.read()


def same_body(directory, v):
    wrapped, body = split(os.path.join(directory, v["file"]))
    source_wrapped, source_body = split(os.path.join(directory, v["body_of"]))
    return body == source_body and wrapped != source_wrapped and wrapped.hex() == v["wrapped_data_key"]


class HashingSink:
    def __init__(self):
        self.h = hashlib.sha256()

    def write(self, data):
        self.h.update(data)

    def hexdigest(self):
        return self.h.hexdigest()


def main():
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command", required=True)
    d = sub.add_parser("decrypt")
    d.add_argument("--data-key", required=True)
    d.add_argument("--in", dest="input", required=True)
    d.add_argument("--out")
    d.add_argument("--context", action="append")
    g = sub.add_parser("golden")
    g.add_argument("directory")
    args = parser.parse_args()
    if args.command == "golden":
        return check_golden(args.directory)
    data_key = bytes.fromhex(args.data_key)
    context = parse_context(args.context)
    out = open(args.out, "wb") if args.out else sys.stdout.buffer
    try:
        with open(args.input, "rb") as f:
            decrypt(f, out, data_key, context)
    except Invalid as e:
        print(f"invalid envelope: {e}", file=sys.stderr)
        return 1
    finally:
        if args.out:
            out.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
