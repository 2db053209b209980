"""Drives Linux functions with boto3, as any AWS user would, on a worker
that has the Linux guest: a provided.al2023 function on the official
lambda_runtime crate (cold, warm, a SnapStart version restored), a
python3.11 function run by awslambdaric, and two container image
functions (a layout directory, and a tar archive with ImageConfig), each
cold then warm; another account reaches none of them. (A python3.11
SnapStart version restores too, through awslambdaric's /restore/next, but
initializing and sealing it takes three minutes under the L1 machine's
emulation: `snap_start("py", ...)` runs it.)

usage: linux_e2e.py ENDPOINT BOOTSTRAP IMAGE_LAYOUT IMAGE_TAR
Credentials of two accounts come from the environment: KEY_A/SECRET_A and
KEY_B/SECRET_B. Prints one line per check; exits non-zero on the first
failed one.
"""
import base64
import io
import json
import os
import sys
import zipfile
from concurrent.futures import ThreadPoolExecutor

import boto3
import botocore
from botocore.config import Config

from checks import check, expect_error

endpoint, bootstrap_path, image_layout, image_tar = sys.argv[1:5]
env = os.environ


def client(key, secret):
    return boto3.client("lambda", endpoint_url=endpoint, region_name="local", aws_access_key_id=key,
                        aws_secret_access_key=secret,
                        config=Config(retries={"max_attempts": 1}, read_timeout=600))


a = client(env["KEY_A"], env["SECRET_A"])
b = client(env["KEY_B"], env["SECRET_B"])
role = "arn:aws:iam::111111111111:role/linux"






def zipped(files):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data, mode in files:
            info = zipfile.ZipInfo(name)
            info.external_attr = (0o100000 | mode) << 16
            z.writestr(info, data)
    return buf.getvalue()


def invoke(name, payload, **kw):
    r = a.invoke(FunctionName=name, Payload=json.dumps(payload).encode(), LogType="Tail", **kw)
    body = json.loads(r["Payload"].read())
    return r, body, base64.b64decode(r["LogResult"]).decode()


def cold_then_warm(name, payload, expected):
    r, body, log = invoke(name, payload)
    check(f"{name}: a cold start answers", body == expected and "Init Duration" in log, (body, log))
    r, body, log = invoke(name, payload)
    check(f"{name}: a warm invoke answers in the same environment",
          body == expected and "REPORT" in log and "Init Duration" not in log, (body, log))


def snap_start(name, payload, expected):
    """Publishes a SnapStart version; its first invocations restore."""
    a.update_function_configuration(FunctionName=name, SnapStart={"ApplyOn": "PublishedVersions"})
    version = a.publish_version(FunctionName=name)["Version"]
    # Initialized and sealed under emulation: minutes, not milliseconds.
    try:
        a.get_waiter("published_version_active").wait(FunctionName=name, Qualifier=version,
                                                      WaiterConfig={"Delay": 2, "MaxAttempts": 300})
    except botocore.exceptions.WaiterError:
        got = a.get_function_configuration(FunctionName=name, Qualifier=version)
        check(f"{name}: its SnapStart version {version} becomes Active", False,
              f"{got['State']}: {got.get('StateReason')}")
    with ThreadPoolExecutor(2) as pool:
        answers = list(pool.map(lambda _: invoke(name, payload, Qualifier=version), range(2)))
    restored = [(body, log) for _, body, log in answers if "Restore Duration" in log]
    check(f"{name}: its SnapStart version {version} restores its snapshot",
          restored and all(expected is None or body == expected for body, _ in restored), answers)
    return answers


bootstrap = open(bootstrap_path, "rb").read()
a.create_function(FunctionName="rust", Runtime="provided.al2023", Role=role, Handler="bootstrap",
                  MemorySize=256, Timeout=120, Code={"ZipFile": zipped([("bootstrap", bootstrap, 0o755)])})
cold_then_warm("rust", {"n": 1}, {"echo": {"n": 1}})
r, body, log = invoke("rust", {"fail": "on purpose"})
check("rust: a function error comes back as Lambda's", r.get("FunctionError") == "Unhandled"
      and body["errorType"] == "Function.Refused", (r, body))
answers = snap_start("rust", {"random": True}, None)
randoms = {body["random"] for _, body, _ in answers}
check("rust: two environments of the version draw their own randomness", len(randoms) == 2, answers)
a.create_function(FunctionName="no-bootstrap", Runtime="provided.al2023", Role=role, Handler="bootstrap",
                  Code={"ZipFile": zipped([("main", b"#!/bin/sh\n", 0o755)])})
r, body, _ = invoke("no-bootstrap", {})
check("a provided function without a bootstrap fails as Lambda's does",
      r.get("FunctionError") == "Unhandled" and body["errorType"] == "Runtime.InvalidEntrypoint"
      and "Couldn't find valid bootstrap(s)" in body["errorMessage"], body)

app = b'''
import json, os

def handler(event, context):
    print("python got", json.dumps(event))
    if event.get("raise"):
        raise ValueError(event["raise"])
    return {"python": event, "function": context.function_name, "version": os.environ["AWS_LAMBDA_FUNCTION_VERSION"]}
'''
a.create_function(FunctionName="py", Runtime="python3.11", Role=role, Handler="app.handler", MemorySize=256,
                  Timeout=120, Code={"ZipFile": zipped([("app.py", app, 0o644)])})
cold_then_warm("py", {"n": 2}, {"python": {"n": 2}, "function": "py", "version": "$LATEST"})
r, body, log = invoke("py", {"raise": "no"})
check("py: an exception is Lambda's error JSON", r.get("FunctionError") == "Unhandled"
      and body["errorType"] == "ValueError" and body["errorMessage"] == "no" and "python got" in log, (body, log))
a.create_function(FunctionName="py-missing", Runtime="python3.11", Role=role, Handler="nothing.handler",
                  Timeout=120, Code={"ZipFile": zipped([("app.py", app, 0o644)])})
r, body, _ = invoke("py-missing", {})
check("py: a handler that names nothing is Runtime.ImportModuleError",
      r.get("FunctionError") == "Unhandled" and body["errorType"] == "Runtime.ImportModuleError", body)

image = a.create_function(FunctionName="image", PackageType="Image", Role=role, MemorySize=256, Timeout=120,
                          Code={"ImageUri": image_layout})
check("image: created from its layout", image["PackageType"] == "Image" and "Runtime" not in image, image)
cold_then_warm("image", {"n": 3}, {"echo": {"n": 3}})
_, described, _ = invoke("image", {"describe": True})
check("image: ENTRYPOINT with CMD, in WORKDIR, with its ENV", described == {
    "args": ["handler", "app.handler"], "cwd": "/var/task", "handler": "app.handler", "greeting": "from the image"},
    described)
a.create_function(FunctionName="image-tar", PackageType="Image", Role=role, MemorySize=256, Timeout=120,
                  Code={"ImageUri": f"file://{image_tar}"},
                  Environment={"Variables": {"GREETING": "from the function"}},
                  ImageConfig={"EntryPoint": ["/usr/local/bin/handler"], "Command": ["other.handler"],
                               "WorkingDirectory": "/usr"})
_, described, _ = invoke("image-tar", {"describe": True})
check("image-tar: ImageConfig and the function's variables win", described == {
    "args": ["/usr/local/bin/handler", "other.handler"], "cwd": "/usr", "handler": "other.handler",
    "greeting": "from the function"}, described)
got = a.get_function(FunctionName="image-tar")
check("image-tar: GetFunction gives its image and ImageConfig", got["Code"]["RepositoryType"] == "ECR"
      and got["Code"]["ImageUri"] == f"file://{image_tar}"
      and got["Configuration"]["ImageConfigResponse"]["ImageConfig"]["WorkingDirectory"] == "/usr", got)
for uri, what in [("relative/layout", "absolute path"), ("/nonexistent/layout", "/nonexistent/layout")]:
    try:
        a.create_function(FunctionName="bad-image", PackageType="Image", Role=role, Code={"ImageUri": uri})
        check(f"ImageUri {uri} is refused", False, "created")
    except botocore.exceptions.ClientError as e:
        check(f"ImageUri {uri} is refused, named", e.response["Error"]["Code"] == "InvalidParameterValueException"
              and what in str(e), e)
expect_error("an Image function takes no Runtime", "InvalidParameterValueException",
             lambda: a.create_function(FunctionName="bad-image", PackageType="Image", Role=role,
                                       Runtime="python3.11", Code={"ImageUri": image_layout}))

for name in ["rust", "py", "image", "image-tar"]:
    arn = a.get_function(FunctionName=name)["Configuration"]["FunctionArn"]
    expect_error(f"account B cannot see {name}", "ResourceNotFoundException", lambda: b.get_function(FunctionName=arn))
    expect_error(f"nor invoke it", "AccessDeniedException", lambda: b.invoke(FunctionName=arn, Payload=b"{}"))
print("all checks passed")
