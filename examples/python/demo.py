"""Deploys examples/python/app.py as a python3.11 function with boto3 and
invokes it cold and warm, printing each response and the REPORT line.

usage: demo.py ENDPOINT   (credentials: AWS_ACCESS_KEY_ID and
AWS_SECRET_ACCESS_KEY in the environment)
"""
import base64
import io
import json
import os
import sys
import time
import zipfile

import boto3
from botocore.config import Config

endpoint = sys.argv[1]
aws = boto3.client("lambda", endpoint_url=endpoint, region_name="local",
                   config=Config(retries={"max_attempts": 1}, read_timeout=300))

buf = io.BytesIO()
with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
    z.write(os.path.join(os.path.dirname(__file__), "app.py"), "app.py")
fn = aws.create_function(FunctionName="hello-python", Runtime="python3.11", Handler="app.handler",
                         Role="arn:aws:iam::111111111111:role/hello", Code={"ZipFile": buf.getvalue()},
                         MemorySize=256, Timeout=30)
print(f"created {fn['FunctionArn']} ({fn['Runtime']})")

for label in ["cold", "warm"]:
    started = time.perf_counter()
    r = aws.invoke(FunctionName="hello-python", LogType="Tail", Payload=json.dumps({"name": label}))
    elapsed = (time.perf_counter() - started) * 1000
    body = r["Payload"].read().decode()
    log = base64.b64decode(r["LogResult"]).decode().splitlines()
    if "FunctionError" in r:
        sys.exit(f"{label}: {r['FunctionError']}: {body}\n" + "\n".join(log))
    report = next(l for l in log if l.startswith("REPORT"))
    report = "  ".join(p for p in report.split("\t")[1:] if not p.startswith("Billed"))
    print(f"{label:>5}: {body} {elapsed:7.2f} ms round trip | {report}")
