"""Deploys the hello function to a lambda-worker with boto3 and invokes
it: one cold start, warm invokes, then through provisioned concurrency
and a SnapStart version's restored cold start.
Prints each response and the timings: the client's round trip and the
REPORT line the worker logs.

usage: demo.py ENDPOINT HELLO_WASM   (credentials: AWS_ACCESS_KEY_ID and
AWS_SECRET_ACCESS_KEY in the environment)
"""
import base64
import io
import sys
import time
import zipfile

import boto3
from botocore.config import Config

endpoint, wasm_path = sys.argv[1], sys.argv[2]
aws = boto3.client("lambda", endpoint_url=endpoint, region_name="local",
                   config=Config(retries={"max_attempts": 1}))

buf = io.BytesIO()
with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
    z.write(wasm_path, "hello.wasm")

fn = aws.create_function(FunctionName="hello", Runtime="wasi-preview1", Handler="hello.wasm",
                         Role="arn:aws:iam::111111111111:role/hello", Code={"ZipFile": buf.getvalue()},
                         MemorySize=128, Timeout=3)
print(f"created {fn['FunctionArn']} ({fn['CodeSize']} bytes of code)")


def invoke(label, **kw):
    started = time.perf_counter()
    r = aws.invoke(FunctionName="hello", LogType="Tail", **kw)
    elapsed = (time.perf_counter() - started) * 1000
    body = r["Payload"].read().decode()
    report = next(l for l in base64.b64decode(r["LogResult"]).decode().splitlines() if l.startswith("REPORT"))
    report = "  ".join(p for p in report.split("\t")[1:] if not p.startswith("Billed"))
    print(f"{label:>12}: {body:32} {elapsed:7.2f} ms round trip | {report}")
    return elapsed


cold = invoke("cold", Payload=b'{"n":0}')
warm = sorted(invoke(f"warm {i}", Payload=b'{"n":%d}' % i) for i in range(1, 6))

version = aws.publish_version(FunctionName="hello")["Version"]
aws.put_provisioned_concurrency_config(FunctionName="hello", Qualifier=version,
                                       ProvisionedConcurrentExecutions=1)
while aws.get_provisioned_concurrency_config(FunctionName="hello", Qualifier=version)["Status"] != "READY":
    time.sleep(0.01)
print(f"provisioned concurrency READY on version {version}")
provisioned = invoke("provisioned", Payload=b'{"n":6}', Qualifier=version)

# SnapStart: the next version is initialized and snapshotted when it is
# published; its cold starts restore the snapshot.
aws.update_function_configuration(FunctionName="hello", SnapStart={"ApplyOn": "PublishedVersions"})
version = aws.publish_version(FunctionName="hello")["Version"]
while (state := aws.get_function_configuration(FunctionName="hello", Qualifier=version)["State"]) == "Pending":
    time.sleep(0.01)
print(f"SnapStart version {version} is {state}")
restored = invoke("SnapStart", Payload=b'{"n":7}', Qualifier=version)

print(f"\ncold start {cold:.2f} ms, warm median {warm[len(warm) // 2]:.2f} ms, "
      f"provisioned {provisioned:.2f} ms, SnapStart cold start {restored:.2f} ms (round trips through boto3)")
