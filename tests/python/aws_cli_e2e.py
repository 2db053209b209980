"""Drives the worker's Lambda API with the AWS CLI (awscli from PyPI),
unchanged, through --endpoint-url: every call the worker serves, as a
deployment script would make them.

usage: aws_cli_e2e.py ENDPOINT WASM_FILE
Credentials come from the environment (KEY_A, SECRET_A). The `aws`
command is the one installed beside this interpreter. Prints one line per
check; exits non-zero on the first failed one.
"""
import base64
import json
import os
import subprocess
import sys
import tempfile
import time
import zipfile

from checks import check

endpoint, wasm_path = sys.argv[1], sys.argv[2]
aws_command = os.path.join(os.path.dirname(sys.executable), "aws")
env = dict(os.environ, AWS_ACCESS_KEY_ID=os.environ["KEY_A"], AWS_SECRET_ACCESS_KEY=os.environ["SECRET_A"],
           AWS_DEFAULT_REGION="local", AWS_PAGER="")
work = tempfile.mkdtemp()




def aws(*args, expect_failure=False):
    """Runs `aws lambda ARGS`; its JSON output, or its stderr when it is
    expected to fail."""
    r = subprocess.run([aws_command, "--endpoint-url", endpoint, "--output", "json", "lambda", *args],
                       env=env, capture_output=True, text=True)
    if expect_failure:
        check(f"aws lambda {args[0]} fails", r.returncode != 0, r.stdout)
        return r.stderr
    check(f"aws lambda {' '.join(args[:1])} exits 0", r.returncode == 0, r.stderr)
    return json.loads(r.stdout) if r.stdout.strip() else {}


zip_path = os.path.join(work, "function.zip")
with zipfile.ZipFile(zip_path, "w") as z:
    z.write(wasm_path, "function.wasm")
role = "arn:aws:iam::111111111111:role/cli"

created = aws("create-function", "--function-name", "cli", "--runtime", "wasi-preview1", "--role", role,
              "--handler", "function.wasm", "--zip-file", f"fileb://{zip_path}", "--tags", "team=cli")
check("create-function", created["FunctionName"] == "cli" and created["Version"] == "$LATEST", created)
arn = created["FunctionArn"]

out = os.path.join(work, "out.json")
r = aws("invoke", "--function-name", "cli", "--payload", '{"n":1}', "--log-type", "Tail", out)
check("invoke writes the answer", open(out, "rb").read() == b'{"echo":{"n":1}}', open(out, "rb").read())
check("invoke reports status and version", r["StatusCode"] == 200 and r["ExecutedVersion"] == "$LATEST", r)
check("invoke's log tail", "REPORT RequestId" in base64.b64decode(r["LogResult"]).decode(), r)

check("publish-version", aws("publish-version", "--function-name", "cli")["Version"] == "1")
aws("update-function-configuration", "--function-name", "cli", "--timeout", "4")
check("publish-version after a change", aws("publish-version", "--function-name", "cli")["Version"] == "2")
versions = aws("list-versions-by-function", "--function-name", "cli", "--page-size", "1")["Versions"]
check("list-versions-by-function, one per page", [v["Version"] for v in versions] == ["$LATEST", "1", "2"],
      versions)

alias = aws("create-alias", "--function-name", "cli", "--name", "live", "--function-version", "1",
            "--routing-config", '{"AdditionalVersionWeights": {"2": 0.5}}')
check("create-alias with weights", alias["RoutingConfig"]["AdditionalVersionWeights"] == {"2": 0.5}, alias)
ran = set()
for _ in range(24):
    ran.add(aws("invoke", "--function-name", "cli", "--qualifier", "live", "--payload", "{}", out)["ExecutedVersion"])
check("the weighted alias runs both versions", ran == {"1", "2"}, ran)
aws("update-alias", "--function-name", "cli", "--name", "live", "--function-version", "2",
    "--routing-config", '{"AdditionalVersionWeights": {}}')
check("get-alias", aws("get-alias", "--function-name", "cli", "--name", "live")["FunctionVersion"] == "2")
check("list-aliases", [a["Name"] for a in aws("list-aliases", "--function-name", "cli")["Aliases"]] == ["live"])

for name in ["cli-2", "cli-3"]:
    aws("create-function", "--function-name", name, "--runtime", "wasi-preview1", "--role", role,
        "--handler", "function.wasm", "--zip-file", f"fileb://{zip_path}")
first = aws("list-functions", "--max-items", "1")
check("list-functions --max-items 1", len(first["Functions"]) == 1 and first.get("NextToken"), first)
rest = aws("list-functions", "--starting-token", first["NextToken"])
names = [f["FunctionName"] for f in first["Functions"] + rest["Functions"]]
check("and --starting-token the rest", names == ["cli", "cli-2", "cli-3"], names)
names = [f["FunctionName"] for f in aws("list-functions", "--page-size", "1")["Functions"]]
check("list-functions across pages of one", names == ["cli", "cli-2", "cli-3"], names)

check("list-tags sees create-function's", aws("list-tags", "--resource", arn)["Tags"] == {"team": "cli"})
aws("tag-resource", "--resource", arn, "--tags", "stage=prod")
aws("untag-resource", "--resource", arn, "--tag-keys", "team")
check("tag-resource and untag-resource", aws("list-tags", "--resource", arn)["Tags"] == {"stage": "prod"})

aws("put-function-concurrency", "--function-name", "cli", "--reserved-concurrent-executions", "5")
check("get-function-concurrency",
      aws("get-function-concurrency", "--function-name", "cli")["ReservedConcurrentExecutions"] == 5)
aws("delete-function-concurrency", "--function-name", "cli")

aws("put-provisioned-concurrency-config", "--function-name", "cli", "--qualifier", "1",
    "--provisioned-concurrent-executions", "1")
deadline = time.time() + 30
while (got := aws("get-provisioned-concurrency-config", "--function-name", "cli", "--qualifier", "1"))["Status"] \
        != "READY" and time.time() < deadline:
    time.sleep(0.1)
check("provisioned concurrency becomes READY", got["Status"] == "READY", got)
listed = aws("list-provisioned-concurrency-configs", "--function-name", "cli")["ProvisionedConcurrencyConfigs"]
check("list-provisioned-concurrency-configs", [c["FunctionArn"] for c in listed] == [arn + ":1"], listed)
aws("delete-provisioned-concurrency-config", "--function-name", "cli", "--qualifier", "1")

layer = aws("publish-layer-version", "--layer-name", "cli-layer", "--zip-file", f"fileb://{zip_path}",
            "--compatible-runtimes", "wasi-preview1")
check("publish-layer-version", layer["Version"] == 1, layer)
check("get-layer-version", aws("get-layer-version", "--layer-name", "cli-layer", "--version-number", "1")
      ["LayerVersionArn"] == layer["LayerVersionArn"])
check("list-layer-versions", [v["Version"] for v in aws("list-layer-versions", "--layer-name", "cli-layer")
                              ["LayerVersions"]] == [1])
check("list-layers", [l["LayerName"] for l in aws("list-layers")["Layers"]] == ["cli-layer"])
aws("delete-layer-version", "--layer-name", "cli-layer", "--version-number", "1")
check("delete-layer-version", aws("list-layer-versions", "--layer-name", "cli-layer")["LayerVersions"] == [])

config = aws("put-function-event-invoke-config", "--function-name", "cli", "--maximum-retry-attempts", "1",
             "--destination-config", json.dumps({"OnFailure": {"Destination": arn.replace(":cli", ":cli-2")}}))
check("put-function-event-invoke-config", config["MaximumRetryAttempts"] == 1, config)
config = aws("update-function-event-invoke-config", "--function-name", "cli", "--maximum-event-age-in-seconds",
             "120")
check("update-function-event-invoke-config", config["MaximumEventAgeInSeconds"] == 120
      and config["MaximumRetryAttempts"] == 1, config)
check("get-function-event-invoke-config", aws("get-function-event-invoke-config", "--function-name", "cli")
      ["DestinationConfig"]["OnFailure"]["Destination"].endswith(":cli-2"))
check("list-function-event-invoke-configs", len(aws("list-function-event-invoke-configs", "--function-name", "cli")
                                                ["FunctionEventInvokeConfigs"]) == 1)
aws("delete-function-event-invoke-config", "--function-name", "cli")

added = aws("add-permission", "--function-name", "cli", "--statement-id", "partner", "--action",
            "lambda:InvokeFunction", "--principal", "222222222222")
check("add-permission", json.loads(added["Statement"])["Sid"] == "partner", added)
policy = json.loads(aws("get-policy", "--function-name", "cli")["Policy"])
check("get-policy", [st["Sid"] for st in policy["Statement"]] == ["partner"], policy)
aws("remove-permission", "--function-name", "cli", "--statement-id", "partner")

snap = aws("update-function-configuration", "--function-name", "cli", "--snap-start", "ApplyOn=PublishedVersions")
check("update-function-configuration --snap-start", snap["SnapStart"]["ApplyOn"] == "PublishedVersions", snap)
version = aws("publish-version", "--function-name", "cli")["Version"]
aws("wait", "published-version-active", "--function-name", "cli", "--qualifier", version)
got = aws("get-function-configuration", "--function-name", "cli", "--qualifier", version)
check("wait published-version-active: the SnapStart version is Active and optimized",
      got["State"] == "Active" and got["SnapStart"]["OptimizationStatus"] == "On", got)
r = aws("invoke", "--function-name", "cli", "--qualifier", version, "--payload", "{}", "--log-type", "Tail", out)
check("and restores", "Restore Duration" in base64.b64decode(r["LogResult"]).decode(), r)

settings = aws("get-account-settings")
check("get-account-settings", settings["AccountUsage"]["FunctionCount"] == 3, settings)

stderr = aws("invoke", "--function-name", "missing", "--payload", "{}", out, expect_failure=True)
check("a missing function is named in the CLI's error", "ResourceNotFoundException" in stderr, stderr)
aws("delete-alias", "--function-name", "cli", "--name", "live")
aws("delete-function", "--function-name", "cli-3")
names = [f["FunctionName"] for f in aws("list-functions")["Functions"]]
check("delete-function", names == ["cli", "cli-2"], names)
print("all checks passed")
