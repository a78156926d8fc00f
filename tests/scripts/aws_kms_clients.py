#!/usr/bin/env python3
"""Real AWS clients against kms's AWS KMS API (tests/e2e/aws_api.rs).

Usage: aws_kms_clients.py MODE ENDPOINT
  MODE: boto3 | esdk | signatures | moto | secrets | edges
Credentials and region come from the environment (AWS_ACCESS_KEY_ID,
AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION, or AWS_SHARED_CREDENTIALS_FILE),
as for any AWS program; `boto3` also reads OUTSIDER_ACCESS_KEY_ID and
OUTSIDER_SECRET_ACCESS_KEY (a key whose principal is not an administrator).
Each mode checks what it can itself (an AssertionError exits non-zero) and
prints one JSON object for the Rust test to check further.
"""

import base64
import datetime
import http.client
import json
import os
import socket
import sys
import urllib.parse

import boto3
import botocore.auth
from botocore.awsrequest import AWSRequest
from botocore.config import Config
from botocore.credentials import Credentials
from botocore.exceptions import ClientError

REGION = os.environ.get("AWS_DEFAULT_REGION", "us-east-1")
# No retries: every answer is the server's first.
NO_RETRIES = Config(retries={"max_attempts": 1, "mode": "standard"})


def client(endpoint, key_id=None, secret=None):
    kwargs = {}
    if key_id:
        kwargs = {"aws_access_key_id": key_id, "aws_secret_access_key": secret}
    return boto3.client(
        "kms", endpoint_url=endpoint, region_name=REGION, config=NO_RETRIES, **kwargs
    )


def error_code(call, *args, **kwargs):
    """The AWS error code `call` fails with (AssertionError if it succeeds)."""
    try:
        call(*args, **kwargs)
    except ClientError as e:
        return e.response["Error"]["Code"]
    raise AssertionError(f"{call.__name__} succeeded; an error was expected")


def check(condition, what):
    if not condition:
        raise AssertionError(what)


def all_pages(call, field, **kwargs):
    items, marker = [], None
    while True:
        page = call(**kwargs, **({"Marker": marker} if marker else {}))
        items.extend(page[field])
        if not page.get("Truncated"):
            return items
        marker = page["NextMarker"]


def run_boto3(endpoint):
    kms = client(endpoint)
    errors = {}
    key = kms.create_key(
        Description="first", Tags=[{"TagKey": "team", "TagValue": "a"}]
    )["KeyMetadata"]
    arn, kid = key["Arn"], key["KeyId"]
    check(key["KeyState"] == "Enabled" and key["Enabled"], f"new key {key}")
    check(arn.endswith(":key/" + kid) and arn.startswith(f"arn:aws:kms:{REGION}:"), arn)
    account = key["AWSAccountId"]
    check(kms.describe_key(KeyId=arn)["KeyMetadata"]["KeyId"] == kid, "describe by ARN")
    check(kms.describe_key(KeyId=kid)["KeyMetadata"]["Arn"] == arn, "describe by id")

    kms.create_alias(AliasName="alias/app", TargetKeyId=kid)
    alias_arn = f"arn:aws:kms:{REGION}:{account}:alias/app"
    for name in ["alias/app", alias_arn]:
        check(kms.describe_key(KeyId=name)["KeyMetadata"]["KeyId"] == kid, name)

    context = {"purpose": "test", "tenant": "t1"}
    encrypted = kms.encrypt(
        KeyId="alias/app", Plaintext=b"secret", EncryptionContext=context,
        GrantTokens=["accepted-and-ignored"],
    )
    check(encrypted["KeyId"] == arn, "Encrypt names the key ARN")
    blob = encrypted["CiphertextBlob"]
    decrypted = kms.decrypt(CiphertextBlob=blob, EncryptionContext=context)
    check(decrypted["Plaintext"] == b"secret" and decrypted["KeyId"] == arn, "Decrypt")
    check(
        kms.decrypt(CiphertextBlob=blob, EncryptionContext=context, KeyId=alias_arn)["Plaintext"]
        == b"secret",
        "Decrypt naming the key by alias ARN",
    )
    errors["Decrypt/wrong-context"] = error_code(
        kms.decrypt, CiphertextBlob=blob, EncryptionContext={"purpose": "other"}
    )
    errors["Decrypt/garbage"] = error_code(kms.decrypt, CiphertextBlob=b"not a ciphertext")

    data_key = kms.generate_data_key(KeyId=arn, KeySpec="AES_256", EncryptionContext=context)
    check(len(data_key["Plaintext"]) == 32 and data_key["KeyId"] == arn, "GenerateDataKey")
    opened = kms.decrypt(CiphertextBlob=data_key["CiphertextBlob"], EncryptionContext=context)
    check(opened["Plaintext"] == data_key["Plaintext"], "the data key decrypts")
    check(len(kms.generate_data_key(KeyId=kid, NumberOfBytes=16)["Plaintext"]) == 16, "16 bytes")
    without = kms.generate_data_key_without_plaintext(KeyId=kid, KeySpec="AES_128")
    check("Plaintext" not in without, "WithoutPlaintext has no plaintext")
    check(len(kms.decrypt(CiphertextBlob=without["CiphertextBlob"])["Plaintext"]) == 16, "AES_128")
    errors["GenerateDataKey/no-size"] = error_code(kms.generate_data_key, KeyId=kid)
    errors["GenerateDataKey/both-sizes"] = error_code(
        kms.generate_data_key, KeyId=kid, KeySpec="AES_256", NumberOfBytes=32
    )

    second = kms.create_key(Description="second")["KeyMetadata"]
    reencrypted = kms.re_encrypt(
        CiphertextBlob=blob, SourceEncryptionContext=context,
        DestinationKeyId=second["Arn"], DestinationEncryptionContext={"moved": "yes"},
    )
    check(reencrypted["SourceKeyId"] == arn and reencrypted["KeyId"] == second["Arn"], "ReEncrypt")
    check(
        kms.decrypt(
            CiphertextBlob=reencrypted["CiphertextBlob"], EncryptionContext={"moved": "yes"}
        )["Plaintext"] == b"secret",
        "the re-encrypted blob decrypts",
    )

    check(len(kms.generate_random(NumberOfBytes=64)["Plaintext"]) == 64, "GenerateRandom")
    errors["GenerateRandom/too-many"] = error_code(kms.generate_random, NumberOfBytes=5000)

    listed = all_pages(kms.list_keys, "Keys", Limit=1)
    ids = {k["KeyId"] for k in listed}
    check({kid, second["KeyId"]} <= ids, f"ListKeys pages hold both keys: {listed}")
    check(all(k["KeyArn"].endswith(k["KeyId"]) for k in listed), "ListKeys ARNs")

    aliases = all_pages(kms.list_aliases, "Aliases")
    check(any(a["AliasName"] == "alias/app" and a["AliasArn"] == alias_arn
              and a["TargetKeyId"] == kid for a in aliases), f"ListAliases {aliases}")
    check([a["AliasName"] for a in kms.list_aliases(KeyId=kid)["Aliases"]] == ["alias/app"],
          "ListAliases for one key")
    errors["CreateAlias/exists"] = error_code(
        kms.create_alias, AliasName="alias/app", TargetKeyId=second["KeyId"]
    )
    kms.update_alias(AliasName="alias/app", TargetKeyId=second["Arn"])
    check(kms.describe_key(KeyId="alias/app")["KeyMetadata"]["KeyId"] == second["KeyId"],
          "UpdateAlias moved it")
    kms.delete_alias(AliasName="alias/app")
    errors["DescribeKey/deleted-alias"] = error_code(kms.describe_key, KeyId="alias/app")

    kms.update_key_description(KeyId=kid, Description="renamed")
    check(kms.describe_key(KeyId=kid)["KeyMetadata"]["Description"] == "renamed", "description")

    kms.tag_resource(KeyId=kid, Tags=[{"TagKey": "env", "TagValue": "prod"}])
    tags = {t["TagKey"]: t["TagValue"] for t in all_pages(kms.list_resource_tags, "Tags", KeyId=kid, Limit=1)}
    check(tags == {"team": "a", "env": "prod"}, f"ListResourceTags {tags}")
    kms.untag_resource(KeyId=kid, TagKeys=["team"])
    check(kms.list_resource_tags(KeyId=kid)["Tags"] == [{"TagKey": "env", "TagValue": "prod"}],
          "UntagResource")

    check(kms.get_key_rotation_status(KeyId=kid)["KeyRotationEnabled"] is False, "rotation off")
    kms.enable_key_rotation(KeyId=kid)
    status = kms.get_key_rotation_status(KeyId=kid)
    check(status["KeyRotationEnabled"] and status["RotationPeriodInDays"] == 365, f"{status}")
    kms.enable_key_rotation(KeyId=kid, RotationPeriodInDays=90)
    check(kms.get_key_rotation_status(KeyId=kid)["RotationPeriodInDays"] == 90, "90 days")
    errors["EnableKeyRotation/period"] = error_code(
        kms.enable_key_rotation, KeyId=kid, RotationPeriodInDays=3000
    )
    kms.disable_key_rotation(KeyId=kid)
    check(kms.get_key_rotation_status(KeyId=kid)["KeyRotationEnabled"] is False, "rotation off")

    check(kms.list_key_rotations(KeyId=kid)["Rotations"] == [], "no rotations yet")
    check(kms.rotate_key_on_demand(KeyId=kid)["KeyId"] == arn, "RotateKeyOnDemand")
    rotations = kms.list_key_rotations(KeyId=kid)["Rotations"]
    check(len(rotations) == 1 and rotations[0]["KeyId"] == arn, f"{rotations}")
    check(kms.decrypt(CiphertextBlob=blob, EncryptionContext=context)["Plaintext"] == b"secret",
          "old ciphertexts decrypt after rotation")

    kms.disable_key(KeyId=kid)
    check(kms.describe_key(KeyId=kid)["KeyMetadata"]["KeyState"] == "Disabled", "disabled")
    errors["Encrypt/disabled"] = error_code(kms.encrypt, KeyId=kid, Plaintext=b"x")
    kms.enable_key(KeyId=kid)
    kms.encrypt(KeyId=kid, Plaintext=b"x")

    scheduled = kms.schedule_key_deletion(KeyId=second["KeyId"], PendingWindowInDays=7)
    check(scheduled["KeyId"] == second["Arn"] and scheduled["KeyState"] == "PendingDeletion"
          and scheduled["PendingWindowInDays"] == 7 and "DeletionDate" in scheduled, f"{scheduled}")
    errors["Encrypt/pending-deletion"] = error_code(
        kms.encrypt, KeyId=second["KeyId"], Plaintext=b"x"
    )
    errors["ScheduleKeyDeletion/window"] = error_code(
        kms.schedule_key_deletion, KeyId=kid, PendingWindowInDays=3
    )
    check(kms.cancel_key_deletion(KeyId=second["Arn"])["KeyId"] == second["Arn"], "cancel")
    state_after_cancel = kms.describe_key(KeyId=second["KeyId"])["KeyMetadata"]["KeyState"]

    errors["DescribeKey/unknown"] = error_code(kms.describe_key, KeyId="key-00000000000000000000000000000000")
    errors["DescribeKey/other-account-arn"] = error_code(
        kms.describe_key, KeyId=f"arn:aws:kms:{REGION}:999999999999:key/{kid}"
    )
    errors["CreateKey/sign-verify"] = error_code(kms.create_key, KeyUsage="SIGN_VERIFY")
    errors["GetKeyPolicy"] = error_code(kms.get_key_policy, KeyId=kid, PolicyName="default")
    errors["CreateGrant"] = error_code(
        kms.create_grant, KeyId=kid, GranteePrincipal="someone", Operations=["Decrypt"]
    )

    # Imported key material (origin EXTERNAL), wrapped with RSAES-OAEP by
    # `cryptography`, as an external party would (SHA-1: SoftHSM2 offers
    # no other OAEP hash).
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import padding

    external = kms.create_key(Origin="EXTERNAL", Description="imported")["KeyMetadata"]
    check(external["KeyState"] == "PendingImport" and external["Origin"] == "EXTERNAL",
          f"{external}")
    errors["Encrypt/pending-import"] = error_code(
        kms.encrypt, KeyId=external["KeyId"], Plaintext=b"x"
    )
    errors["GetParametersForImport/kms-origin"] = error_code(
        kms.get_parameters_for_import, KeyId=kid,
        WrappingAlgorithm="RSAES_OAEP_SHA_256", WrappingKeySpec="RSA_2048",
    )
    params = kms.get_parameters_for_import(
        KeyId=external["Arn"], WrappingAlgorithm="RSAES_OAEP_SHA_1", WrappingKeySpec="RSA_2048"
    )
    check(params["KeyId"] == external["Arn"], "GetParametersForImport names the ARN")
    public_key = serialization.load_der_public_key(params["PublicKey"])
    wrapped = public_key.encrypt(
        os.urandom(32),
        padding.OAEP(mgf=padding.MGF1(hashes.SHA1()), algorithm=hashes.SHA1(), label=None),
    )
    errors["ImportKeyMaterial/expiring"] = error_code(
        kms.import_key_material, KeyId=external["KeyId"], ImportToken=params["ImportToken"],
        EncryptedKeyMaterial=wrapped, ExpirationModel="KEY_MATERIAL_EXPIRES",
        ValidTo=datetime.datetime(2100, 1, 1),
    )
    kms.import_key_material(
        KeyId=external["KeyId"], ImportToken=params["ImportToken"],
        EncryptedKeyMaterial=wrapped, ExpirationModel="KEY_MATERIAL_DOES_NOT_EXPIRE",
    )
    errors["ImportKeyMaterial/token-used"] = error_code(
        kms.import_key_material, KeyId=external["KeyId"], ImportToken=params["ImportToken"],
        EncryptedKeyMaterial=wrapped, ExpirationModel="KEY_MATERIAL_DOES_NOT_EXPIRE",
    )
    check(kms.describe_key(KeyId=external["KeyId"])["KeyMetadata"]["KeyState"] == "Enabled",
          "enabled after import")
    sealed = kms.encrypt(KeyId=external["KeyId"], Plaintext=b"imported")["CiphertextBlob"]
    check(kms.decrypt(CiphertextBlob=sealed)["Plaintext"] == b"imported", "imported key works")

    outsider = client(
        endpoint, os.environ["OUTSIDER_ACCESS_KEY_ID"], os.environ["OUTSIDER_SECRET_ACCESS_KEY"]
    )
    errors["ListKeys/not-admin"] = error_code(outsider.list_keys)
    print(json.dumps({
        "key_arn": arn, "key_id": kid, "second_key_id": second["KeyId"],
        "state_after_cancel": state_after_cancel, "errors": errors,
    }))


def run_esdk(endpoint):
    """The AWS Encryption SDK with a KMS master key provider whose botocore
    clients point at kms (AWS_ENDPOINT_URL_KMS, honoured by botocore)."""
    import aws_encryption_sdk
    from aws_encryption_sdk import CommitmentPolicy

    os.environ["AWS_ENDPOINT_URL_KMS"] = endpoint
    kms = client(endpoint)
    arn = kms.create_key(Description="encryption sdk")["KeyMetadata"]["Arn"]
    esdk = aws_encryption_sdk.EncryptionSDKClient(
        commitment_policy=CommitmentPolicy.REQUIRE_ENCRYPT_REQUIRE_DECRYPT
    )
    provider = aws_encryption_sdk.StrictAwsKmsMasterKeyProvider(key_ids=[arn])
    message = b"a message for the AWS Encryption SDK" * 100
    context = {"order": "42"}
    ciphertext, header = esdk.encrypt(
        source=message, key_provider=provider, encryption_context=context
    )
    check([k.key_provider.key_info.decode() for k in header.encrypted_data_keys] == [arn],
          f"one data key, under {arn}")
    plaintext, decrypt_header = esdk.decrypt(source=ciphertext, key_provider=provider)
    check(plaintext == message, "decrypts")
    check(decrypt_header.encryption_context["order"] == "42", "context kept")

    kms.rotate_key_on_demand(KeyId=arn)
    fresh_provider = aws_encryption_sdk.StrictAwsKmsMasterKeyProvider(key_ids=[arn])
    again, _ = esdk.decrypt(source=ciphertext, key_provider=fresh_provider)
    check(again == message, "decrypts after a key rotation")
    after, _ = esdk.encrypt(source=b"after rotation", key_provider=fresh_provider)
    check(esdk.decrypt(source=after, key_provider=provider)[0] == b"after rotation",
          "a message made after rotation decrypts")
    print(json.dumps({"key_arn": arn, "ciphertext_bytes": len(ciphertext)}))


def send(endpoint, headers, body):
    url = urllib.parse.urlparse(endpoint)
    connection = http.client.HTTPConnection(url.hostname, url.port, timeout=30)
    connection.request("POST", "/", body=body, headers=headers)
    response = connection.getresponse()
    payload = response.read()
    connection.close()
    return response.status, json.loads(payload) if payload else {}


def signed_headers(endpoint, body, credentials, when=None, operation="DescribeKey"):
    request = AWSRequest(
        method="POST", url=endpoint + "/", data=body,
        headers={
            "Content-Type": "application/x-amz-json-1.1",
            "X-Amz-Target": "TrentService." + operation,
        },
    )
    original = botocore.auth.get_current_datetime
    if when is not None:
        botocore.auth.get_current_datetime = lambda: when
    try:
        botocore.auth.SigV4Auth(credentials, "kms", REGION).add_auth(request)
    finally:
        botocore.auth.get_current_datetime = original
    return dict(request.headers.items())


def run_signatures(endpoint):
    """Hand-signed requests: one good, then each kind of bad signature."""
    kms = client(endpoint)
    kid = kms.create_key(Description="signatures")["KeyMetadata"]["KeyId"]
    key_id = os.environ["AWS_ACCESS_KEY_ID"]
    good = Credentials(key_id, os.environ["AWS_SECRET_ACCESS_KEY"])
    body = json.dumps({"KeyId": kid}).encode()
    results = {}
    results["good"] = send(endpoint, signed_headers(endpoint, body, good), body)
    wrong = Credentials(key_id, "wrong" + os.environ["AWS_SECRET_ACCESS_KEY"][5:])
    results["wrong-secret"] = send(endpoint, signed_headers(endpoint, body, wrong), body)
    stale = datetime.datetime.now(datetime.timezone.utc).replace(tzinfo=None) - datetime.timedelta(minutes=20)
    results["outside-skew"] = send(endpoint, signed_headers(endpoint, body, good, when=stale), body)
    other = json.dumps({"KeyId": "alias/something-else"}).encode()
    results["changed-body"] = send(endpoint, signed_headers(endpoint, body, good), other)
    replayed = signed_headers(endpoint, body, good)
    results["replayed-within-skew"] = send(endpoint, replayed, body)
    unsigned = {"Content-Type": "application/x-amz-json-1.1", "X-Amz-Target": "TrentService.DescribeKey"}
    results["unsigned"] = send(endpoint, unsigned, body)
    unknown = Credentials("AKIAUNKNOWNUNKNOWN00", os.environ["AWS_SECRET_ACCESS_KEY"])
    results["unknown-key"] = send(endpoint, signed_headers(endpoint, body, unknown), body)
    print(json.dumps({"key_id": kid, "results": results}))


def shape(value):
    """The shape of a response: field names and JSON types, recursively
    (lists by their first element)."""
    if isinstance(value, dict):
        return {k: shape(v) for k, v in value.items() if k != "ResponseMetadata"}
    if isinstance(value, list):
        return [shape(value[0])] if value else []
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, (bytes, bytearray)):
        return "blob"
    if isinstance(value, datetime.datetime):
        return "timestamp"
    return type(value).__name__


def sequence(kms):
    """The same calls against any AWS KMS API: each call's response shape
    or error code."""
    out = []

    def call(name, fn, **kwargs):
        try:
            out.append([name, shape(fn(**kwargs))])
        except ClientError as e:
            out.append([name, "error:" + e.response["Error"]["Code"]])
            return None
        return fn

    key = kms.create_key(Description="compare", Tags=[{"TagKey": "a", "TagValue": "b"}])
    out.append(["CreateKey", shape(key)])
    kid = key["KeyMetadata"]["KeyId"]
    call("DescribeKey", kms.describe_key, KeyId=kid)
    call("ListKeys", kms.list_keys)
    blob = kms.encrypt(KeyId=kid, Plaintext=b"p", EncryptionContext={"c": "1"})
    out.append(["Encrypt", shape(blob)])
    call("Decrypt", kms.decrypt, CiphertextBlob=blob["CiphertextBlob"], EncryptionContext={"c": "1"})
    call("Decrypt/wrong-context", kms.decrypt, CiphertextBlob=blob["CiphertextBlob"],
         EncryptionContext={"c": "2"})
    call("GenerateDataKey", kms.generate_data_key, KeyId=kid, KeySpec="AES_256")
    call("GenerateDataKeyWithoutPlaintext", kms.generate_data_key_without_plaintext,
         KeyId=kid, NumberOfBytes=32)
    call("ReEncrypt", kms.re_encrypt, CiphertextBlob=blob["CiphertextBlob"],
         SourceEncryptionContext={"c": "1"}, DestinationKeyId=kid)
    call("GenerateRandom", kms.generate_random, NumberOfBytes=16)
    call("CreateAlias", kms.create_alias, AliasName="alias/compare", TargetKeyId=kid)
    call("ListAliases", kms.list_aliases, KeyId=kid)
    call("UpdateAlias", kms.update_alias, AliasName="alias/compare", TargetKeyId=kid)
    call("DeleteAlias", kms.delete_alias, AliasName="alias/compare")
    call("DescribeKey/deleted-alias", kms.describe_key, KeyId="alias/compare")
    call("UpdateKeyDescription", kms.update_key_description, KeyId=kid, Description="d")
    call("TagResource", kms.tag_resource, KeyId=kid, Tags=[{"TagKey": "x", "TagValue": "y"}])
    call("ListResourceTags", kms.list_resource_tags, KeyId=kid)
    call("UntagResource", kms.untag_resource, KeyId=kid, TagKeys=["x"])
    call("EnableKeyRotation", kms.enable_key_rotation, KeyId=kid)
    call("GetKeyRotationStatus", kms.get_key_rotation_status, KeyId=kid)
    call("DisableKeyRotation", kms.disable_key_rotation, KeyId=kid)
    call("RotateKeyOnDemand", kms.rotate_key_on_demand, KeyId=kid)
    call("ListKeyRotations", kms.list_key_rotations, KeyId=kid)
    call("DisableKey", kms.disable_key, KeyId=kid)
    call("Encrypt/disabled", kms.encrypt, KeyId=kid, Plaintext=b"p")
    call("EnableKey", kms.enable_key, KeyId=kid)
    call("ScheduleKeyDeletion", kms.schedule_key_deletion, KeyId=kid, PendingWindowInDays=7)
    call("Encrypt/pending-deletion", kms.encrypt, KeyId=kid, Plaintext=b"p")
    call("CancelKeyDeletion", kms.cancel_key_deletion, KeyId=kid)
    call("DescribeKey/unknown", kms.describe_key, KeyId="alias/does-not-exist")
    return out


def run_moto(endpoint):
    """The same sequence against moto (in-process, another loopback port)
    and against kms; both lists of (call, shape or error code) printed."""
    from moto.server import ThreadedMotoServer

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        moto_kms = client(f"http://127.0.0.1:{port}", "AKIAMOTOMOTOMOTO0000", "moto-secret-moto-secret")
        reference = sequence(moto_kms)
    finally:
        server.stop()
    ours = sequence(client(endpoint))
    print(json.dumps({"moto": reference, "kms": ours}))


def signing_key(secret, date):
    """SigV4's derived signing key of `secret` for `date` (YYYYMMDD), kms in
    REGION: as good as the secret for a day, so it must not leak either."""
    import hashlib
    import hmac

    key = ("AWS4" + secret).encode()
    for part in [date, REGION, "kms", "aws4_request"]:
        key = hmac.new(key, part.encode(), hashlib.sha256).digest()
    return key


def run_secrets(endpoint):
    """Traffic that carries secrets, good and refused, for the leak scan of
    tests/e2e/secrets.rs: every plaintext, data key and random byte string
    sent or received is printed (base64), with the SigV4 signing keys of
    today and yesterday (UTC)."""
    kms = client(endpoint)
    credentials = boto3.Session().get_credentials().get_frozen_credentials()
    good = Credentials(credentials.access_key, credentials.secret_key)
    secrets = []

    def keep(value):
        secrets.append(base64.b64encode(value).decode())
        return value

    kid = kms.create_key(Description="leak check")["KeyMetadata"]["KeyId"]
    other = kms.create_key(Description="leak check 2")["KeyMetadata"]["KeyId"]
    kms.create_alias(AliasName="alias/leak-check", TargetKeyId=kid)
    context = {"tenant": "acme"}
    for i in range(8):
        plaintext = keep(f"AWS-LEAK-PLAINTEXT-{i:02}-Zt4wQm8r".encode())
        blob = kms.encrypt(KeyId="alias/leak-check", Plaintext=plaintext,
                           EncryptionContext=context)["CiphertextBlob"]
        opened = kms.decrypt(CiphertextBlob=blob, EncryptionContext=context)["Plaintext"]
        check(opened == plaintext, "decrypts")
        error_code(kms.decrypt, CiphertextBlob=blob, EncryptionContext={"tenant": "other"})
        moved = kms.re_encrypt(CiphertextBlob=blob, SourceEncryptionContext=context,
                               DestinationKeyId=other)["CiphertextBlob"]
        check(kms.decrypt(CiphertextBlob=moved)["Plaintext"] == plaintext, "re-encrypted")
        keep(kms.generate_data_key(KeyId=kid, KeySpec="AES_256",
                                   EncryptionContext=context)["Plaintext"])
        keep(kms.generate_data_key(KeyId=kid, NumberOfBytes=64)["Plaintext"])
        sealed = kms.generate_data_key_without_plaintext(KeyId=kid, KeySpec="AES_128")
        keep(kms.decrypt(CiphertextBlob=sealed["CiphertextBlob"])["Plaintext"])
        keep(kms.generate_random(NumberOfBytes=32)["Plaintext"])
    # Refused requests that carry plaintext: unknown key, too long, a
    # disabled key, a malformed body.
    error_code(kms.encrypt, KeyId="alias/none-such",
               Plaintext=keep(b"AWS-LEAK-REFUSED-UNKNOWN-KEY-7hQ2"))
    error_code(kms.encrypt, KeyId=kid, Plaintext=keep(b"AWS-LEAK-TOO-LONG-" + b"x" * 4096))
    kms.disable_key(KeyId=other)
    error_code(kms.encrypt, KeyId=other, Plaintext=keep(b"AWS-LEAK-REFUSED-DISABLED-3mKp"))
    malformed = json.dumps({
        "KeyId": 5, "Plaintext": base64.b64encode(keep(b"AWS-LEAK-MALFORMED-BODY-9vXc")).decode()
    }).encode()
    status, answer = send(endpoint, signed_headers(endpoint, malformed, good, operation="Encrypt"),
                          malformed)
    check(status == 400 and answer["__type"] == "SerializationException", f"{status} {answer}")
    # Hand-signed requests: good, then refused signatures over bodies with
    # plaintext.
    body = json.dumps({"KeyId": kid, "Plaintext": base64.b64encode(
        keep(b"AWS-LEAK-SIGNED-GOOD-5rTn")).decode()}).encode()
    status, _ = send(endpoint, signed_headers(endpoint, body, good, operation="Encrypt"), body)
    check(status == 200, f"good signature: {status}")
    wrong = Credentials(credentials.access_key, "wrong" + credentials.secret_key[5:])
    refused = []
    body = json.dumps({"KeyId": kid, "Plaintext": base64.b64encode(
        keep(b"AWS-LEAK-SIGNED-WRONG-SECRET-8pLs")).decode()}).encode()
    refused.append(send(endpoint, signed_headers(endpoint, body, wrong, operation="Encrypt"), body))
    changed = json.dumps({"KeyId": kid, "Plaintext": base64.b64encode(
        keep(b"AWS-LEAK-SIGNED-CHANGED-BODY-2wQz")).decode()}).encode()
    refused.append(send(endpoint, signed_headers(endpoint, body, good, operation="Encrypt"), changed))
    stale = datetime.datetime.now(datetime.timezone.utc).replace(tzinfo=None) - datetime.timedelta(minutes=20)
    refused.append(send(endpoint, signed_headers(endpoint, body, good, when=stale,
                                                 operation="Encrypt"), body))
    check(all(s == 400 and a["__type"] == "InvalidSignatureException" for s, a in refused),
          f"{refused}")
    now = datetime.datetime.now(datetime.timezone.utc)
    days = [(now - datetime.timedelta(days=d)).strftime("%Y%m%d") for d in (0, 1)]
    print(json.dumps({
        "secrets": secrets,
        "signing_keys": [base64.b64encode(signing_key(credentials.secret_key, d)).decode()
                         for d in days],
    }))


def run_edges(endpoint):
    """A demanding user's odd but legal (and illegal) inputs, with botocore's
    client-side validation off so that the server judges every value:
    each case's outcome ("ok" or "error:<Code>") and, for hand-made HTTP
    requests, (status, __type)."""
    kms = boto3.client(
        "kms", endpoint_url=endpoint, region_name=REGION,
        config=Config(retries={"max_attempts": 1, "mode": "standard"},
                      parameter_validation=False),
    )
    outcomes = {}

    def case(name, fn, **kwargs):
        try:
            result = fn(**kwargs)
            outcomes[name] = "ok"
            return result
        except ClientError as e:
            outcomes[name] = "error:" + e.response["Error"]["Code"]
            check(e.response["ResponseMetadata"]["HTTPStatusCode"] == 400,
                  f"{name}: status {e.response['ResponseMetadata']['HTTPStatusCode']}")
            return None

    kid = kms.create_key(Description="edges")["KeyMetadata"]["KeyId"]
    other = kms.create_key(Description="edges 2")["KeyMetadata"]["KeyId"]

    sealed = case("Encrypt/empty-context", kms.encrypt, KeyId=kid, Plaintext=b"x",
                  EncryptionContext={})
    check(kms.decrypt(CiphertextBlob=sealed["CiphertextBlob"])["Plaintext"] == b"x",
          "an empty context is no context")
    big = {f"key-{i:03}": "v" * 60 for i in range(100)}
    case("Encrypt/6KiB-context", kms.encrypt, KeyId=kid, Plaintext=b"x", EncryptionContext=big)
    case("Encrypt/4096", kms.encrypt, KeyId=kid, Plaintext=b"x" * 4096)
    case("Encrypt/4097", kms.encrypt, KeyId=kid, Plaintext=b"x" * 4097)
    case("Encrypt/0", kms.encrypt, KeyId=kid, Plaintext=b"")
    for n in [1, 1024, 1025, 0]:
        dk = case(f"GenerateDataKey/{n}", kms.generate_data_key, KeyId=kid, NumberOfBytes=n)
        check(dk is None or len(dk["Plaintext"]) == n, f"{n} bytes")
        rnd = case(f"GenerateRandom/{n}", kms.generate_random, NumberOfBytes=n)
        check(rnd is None or len(rnd["Plaintext"]) == n, f"{n} random bytes")
    for spec, size in [("AES_128", 16), ("AES_256", 32), ("AES_512", None)]:
        dk = case(f"GenerateDataKey/{spec}", kms.generate_data_key, KeyId=kid, KeySpec=spec)
        check(dk is None or len(dk["Plaintext"]) == size, spec)
        case(f"GenerateDataKeyWithoutPlaintext/{spec}",
             kms.generate_data_key_without_plaintext, KeyId=kid, KeySpec=spec)

    # Paging one item at a time through everything: each item once.
    for i in range(3):
        kms.create_alias(AliasName=f"alias/page-{i}", TargetKeyId=kid if i % 2 else other)
    keys = all_pages(kms.list_keys, "Keys", Limit=1)
    check(sorted(k["KeyId"] for k in keys) == sorted({kid, other}), f"ListKeys pages: {keys}")
    aliases = [a["AliasName"] for a in all_pages(kms.list_aliases, "Aliases", Limit=1)]
    check(sorted(aliases) == [f"alias/page-{i}" for i in range(3)], f"ListAliases pages: {aliases}")
    case("ListKeys/Limit-0", kms.list_keys, Limit=0)
    case("ListKeys/Limit-1001", kms.list_keys, Limit=1001)
    case("ListKeys/foreign-marker", kms.list_keys, Marker="not-a-marker-of-ours")
    case("ListAliases/foreign-marker", kms.list_aliases, Marker="not-a-marker-of-ours")
    kms.rotate_key_on_demand(KeyId=kid)
    case("ListKeyRotations/foreign-marker", kms.list_key_rotations, KeyId=kid,
         Marker="not-a-marker-of-ours")

    # Alias names AWS accepts and refuses.
    case("CreateAlias/alias-aws-x", kms.create_alias, AliasName="alias/aws/x", TargetKeyId=kid)
    case("UpdateAlias/alias-aws-x", kms.update_alias, AliasName="alias/aws/x", TargetKeyId=kid)
    case("CreateAlias/alias-awsome", kms.create_alias, AliasName="alias/awsome", TargetKeyId=kid)
    case("CreateAlias/256-chars", kms.create_alias, AliasName="alias/" + "a" * 250,
         TargetKeyId=kid)
    case("CreateAlias/257-chars", kms.create_alias, AliasName="alias/" + "a" * 251,
         TargetKeyId=kid)
    case("CreateAlias/colon", kms.create_alias, AliasName="alias/a:b", TargetKeyId=kid)
    case("CreateAlias/no-prefix", kms.create_alias, AliasName="no-prefix", TargetKeyId=kid)

    # Key identifiers that are not ours: AWS's UUID form, nonsense.
    case("DescribeKey/uuid", kms.describe_key, KeyId="1234abcd-12ab-34cd-56ef-1234567890ab")
    case("DescribeKey/nonsense", kms.describe_key, KeyId="nonsense")
    case("Encrypt/nonsense-key", kms.encrypt, KeyId="nonsense", Plaintext=b"x")
    case("ListAliases/nonsense-key", kms.list_aliases, KeyId="nonsense")

    # Deletion windows and cancelling twice.
    for days in [6, 7, 30, 31]:
        if case(f"ScheduleKeyDeletion/{days}", kms.schedule_key_deletion, KeyId=other,
                PendingWindowInDays=days):
            kms.cancel_key_deletion(KeyId=other)
    kms.schedule_key_deletion(KeyId=other, PendingWindowInDays=7)
    case("ScheduleKeyDeletion/again", kms.schedule_key_deletion, KeyId=other)
    pending = kms.describe_key(KeyId=other)["KeyMetadata"]
    check(pending["KeyState"] == "PendingDeletion" and "DeletionDate" in pending, f"{pending}")
    case("CancelKeyDeletion/first", kms.cancel_key_deletion, KeyId=other)
    case("CancelKeyDeletion/second", kms.cancel_key_deletion, KeyId=other)
    # AWS leaves a key whose deletion was cancelled Disabled.
    check(kms.describe_key(KeyId=other)["KeyMetadata"]["KeyState"] == "Disabled",
          "Disabled after CancelKeyDeletion")
    kms.enable_key(KeyId=other)

    # ReEncrypt between keys and contexts.
    blob = kms.encrypt(KeyId=kid, Plaintext=b"moving", EncryptionContext={"a": "1"})
    moved = case("ReEncrypt/other-key-other-context", kms.re_encrypt,
                 CiphertextBlob=blob["CiphertextBlob"], SourceEncryptionContext={"a": "1"},
                 DestinationKeyId=other, DestinationEncryptionContext={"b": "2"})
    check(kms.decrypt(CiphertextBlob=moved["CiphertextBlob"],
                      EncryptionContext={"b": "2"})["Plaintext"] == b"moving", "moved")
    case("ReEncrypt/wrong-source-context", kms.re_encrypt,
         CiphertextBlob=blob["CiphertextBlob"], SourceEncryptionContext={"a": "2"},
         DestinationKeyId=other)

    # DryRun: never performed (no data key handed out).
    case("Encrypt/DryRun", kms.encrypt, KeyId=kid, Plaintext=b"x", DryRun=True)
    case("GenerateDataKey/DryRun", kms.generate_data_key, KeyId=kid, KeySpec="AES_256",
         DryRun=True)
    case("Encrypt/DryRun-false", kms.encrypt, KeyId=kid, Plaintext=b"x", DryRun=False)

    case("TagResource/aws-prefix", kms.tag_resource, KeyId=kid,
         Tags=[{"TagKey": "aws:reserved", "TagValue": "v"}])
    case("CreateKey/aws-prefix-tag", kms.create_key,
         Tags=[{"TagKey": "aws:reserved", "TagValue": "v"}])

    # Hand-made HTTP.
    credentials = boto3.Session().get_credentials().get_frozen_credentials()
    good = Credentials(credentials.access_key, credentials.secret_key)

    def raw(name, body, operation="ListKeys", headers=None, method="POST", path="/"):
        request = AWSRequest(method=method, url=endpoint + path, data=body, headers=headers or {
            "Content-Type": "application/x-amz-json-1.1",
            "X-Amz-Target": "TrentService." + operation,
        })
        botocore.auth.SigV4Auth(good, "kms", REGION).add_auth(request)
        url = urllib.parse.urlparse(endpoint)
        connection = http.client.HTTPConnection(url.hostname, url.port, timeout=30)
        connection.request(method, path, body=body, headers=dict(request.headers.items()))
        response = connection.getresponse()
        payload = response.read()
        connection.close()
        answer = json.loads(payload) if payload else {}
        outcomes[name] = [response.status, answer.get("__type", "ok")]

    raw("http/array-body", b"[]")
    raw("http/garbage-body", b"{not json")
    raw("http/no-target", b"{}", headers={"Content-Type": "application/x-amz-json-1.1"})
    raw("http/GET", b"", method="GET")
    raw("http/other-path", b"{}", path="/other")
    raw("http/bad-base64", json.dumps({"CiphertextBlob": "!!not base64"}).encode(), "Decrypt")
    raw("http/9MiB-body", b"{" + b" " * (9 << 20) + b"}")
    print(json.dumps({"outcomes": outcomes}))


if __name__ == "__main__":
    mode, endpoint = sys.argv[1], sys.argv[2]
    {"boto3": run_boto3, "esdk": run_esdk, "signatures": run_signatures, "moto": run_moto,
     "secrets": run_secrets, "edges": run_edges}[mode](endpoint)
