"""Drives a fleet's front end with boto3, as any AWS user would: the
functions it creates run on the fleet's worker hosts.

usage: fleet_e2e.py ENDPOINT WASM_FILE
Credentials of two accounts come from the environment: KEY_A/SECRET_A and
KEY_B/SECRET_B. Prints one line per check and the id of an Event
invocation (`event-id: ...`); exits non-zero on the first failed one.
"""
import base64
import json
import sys

import boto3
from botocore.config import Config

from checks import check, expect_error, zipped

endpoint, wasm_path = sys.argv[1], sys.argv[2]
env = __import__("os").environ


def client(key, secret):
    return boto3.client(
        "lambda",
        endpoint_url=endpoint,
        region_name="local",
        aws_access_key_id=key,
        aws_secret_access_key=secret,
        config=Config(retries={"max_attempts": 1}, read_timeout=60),
    )


a = client(env["KEY_A"], env["SECRET_A"])
b = client(env["KEY_B"], env["SECRET_B"])


def invoke(fn, payload, **kw):
    r = fn(Payload=json.dumps(payload).encode(), LogType="Tail", **kw)
    log = base64.b64decode(r.get("LogResult", "")).decode()
    return r, json.loads(r["Payload"].read() or b"null"), log


wasm = open(wasm_path, "rb").read()
created = a.create_function(
    FunctionName="echo", Runtime="wasi-preview1", Handler="function.wasm",
    Role="arn:aws:iam::111111111111:role/r", Code={"ZipFile": zipped("function.wasm", wasm)},
    Timeout=10,
)
check("create_function through the front end", created["State"] == "Active", created)

r, body, log = invoke(lambda **kw: a.invoke(FunctionName="echo", **kw), {"n": 1})
check("a cold invoke runs on a worker host", body == {"echo": {"n": 1}}, body)
check("its REPORT gives Init Duration", "Init Duration" in log, log)
r, body, log = invoke(lambda **kw: a.invoke(FunctionName="echo", **kw), {"n": 2})
check("the next is warm", body == {"echo": {"n": 2}} and "Init Duration" not in log, log)

version = a.publish_version(FunctionName="echo")["Version"]
a.create_alias(FunctionName="echo", Name="live", FunctionVersion=version)
r, body, _ = invoke(lambda **kw: a.invoke(FunctionName="echo", Qualifier="live", **kw), {"n": 3})
check("an alias's version runs", body == {"echo": {"n": 3}} and r["ExecutedVersion"] == version, r)

event = a.invoke(FunctionName="echo", InvocationType="Event", Payload=b'{"event":1}')
check("an Event invoke is accepted", event["StatusCode"] == 202, event)
print("event-id:", event["ResponseMetadata"]["RequestId"])

# New code (the module with a custom section added): $LATEST's idle
# environments on the hosts are retired, and the next invoke starts one of
# the new code.
updated = a.update_function_code(
    FunctionName="echo", ZipFile=zipped("function.wasm", wasm + b"\x00\x05\x04note"))
check("update_function_code", updated["CodeSha256"] != created["CodeSha256"], updated)
r, body, log = invoke(lambda **kw: a.invoke(FunctionName="echo", **kw), {"n": 4})
check("$LATEST after an update starts afresh", "Init Duration" in log and body == {"echo": {"n": 4}}, log)

expect_error("another account cannot invoke it", "AccessDeniedException",
             lambda: b.invoke(FunctionName=created["FunctionArn"], Payload=b"{}"))
a.delete_function(FunctionName="echo")
expect_error("a deleted function is not found", "ResourceNotFoundException",
             lambda: a.invoke(FunctionName="echo", Payload=b"{}"))
print("all checks passed")
