"""Drives the worker's Lambda API with boto3, as any AWS user would.

usage: lambda_api_e2e.py ENDPOINT WASM_FILE
Credentials of two accounts come from the environment: KEY_A/SECRET_A and
KEY_B/SECRET_B. Prints one line per check; exits non-zero on the first
failed one.
"""
import base64
import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import boto3
import botocore
from botocore.config import Config

from checks import check, expect_error, zipped

endpoint, wasm_path = sys.argv[1], sys.argv[2]
env = __import__("os").environ


def client(key, secret, validate=True, token=None):
    return boto3.client(
        "lambda",
        endpoint_url=endpoint,
        region_name="local",
        aws_access_key_id=key,
        aws_secret_access_key=secret,
        aws_session_token=token,
        config=Config(retries={"max_attempts": 1}, read_timeout=60,
                      parameter_validation=validate),
    )


a = client(env["KEY_A"], env["SECRET_A"])
# botocore checks ranges itself; this one lets bad values reach the server.
a_unchecked = client(env["KEY_A"], env["SECRET_A"], validate=False)
b = client(env["KEY_B"], env["SECRET_B"])






def wait_until_ready(qualifier):
    deadline = time.time() + 30
    while True:
        got = a.get_provisioned_concurrency_config(FunctionName="echo", Qualifier=qualifier)
        if got["Status"] == "READY" or time.time() > deadline:
            return got
        time.sleep(0.05)


if sys.argv[3:] == ["after-restart"]:
    got = a.get_function(FunctionName="echo")["Configuration"]
    check("the function survived the restart", got["Timeout"] == 6, got)
    versions = [v["Version"] for v in a.list_versions_by_function(FunctionName="echo")["Versions"]]
    check("its versions survived", versions == ["$LATEST", "1", "2"], versions)
    check("its alias survived", a.get_alias(FunctionName="echo", Name="prod")["FunctionVersion"] == "2")
    check("tags survived", a.get_function(FunctionName="tagged")["Tags"] == {"stage": "prod"})
    weights = a.get_alias(FunctionName="canary", Name="live").get("RoutingConfig", {})
    check("a routing config's change survived", not weights.get("AdditionalVersionWeights"), weights)
    got = wait_until_ready("prod")
    check("provisioned concurrency is back after the restart", got["Status"] == "READY", got)
    r = a.invoke(FunctionName="echo", Qualifier="prod", Payload=b'{"after":1}', LogType="Tail")
    check("and it still runs", r["Payload"].read() == b'{"echo":{"after":1}}')
    log = base64.b64decode(r["LogResult"]).decode()
    check("on a provisioned environment", "REPORT" in log and "Init Duration" not in log, log)
    print("all checks passed")
    sys.exit(0)

wasm = open(wasm_path, "rb").read()
code = zipped("function.wasm", wasm)
role = "arn:aws:iam::111111111111:role/echo"

created = a.create_function(
    FunctionName="echo",
    Runtime="wasi-preview1",
    Role=role,
    Handler="function.wasm",
    Code={"ZipFile": code},
    MemorySize=128,
    Timeout=5,
    Environment={"Variables": {"GREETING": "hello"}},
)
check("create returns $LATEST", created["Version"] == "$LATEST", created)
check("create reports the code hash", created["CodeSha256"] and created["CodeSize"] == len(code), created)
expect_error("create twice is a conflict", "ResourceConflictException",
             lambda: a.create_function(FunctionName="echo", Runtime="wasi-preview1", Role=role,
                                       Handler="function.wasm", Code={"ZipFile": code}))
expect_error("a bad memory size is named", "InvalidParameterValueException",
             lambda: a_unchecked.create_function(FunctionName="m", Runtime="wasi-preview1", Role=role,
                                       Handler="function.wasm", Code={"ZipFile": code}, MemorySize=64))
expect_error("a non-zip is refused", "InvalidZipFileException",
             lambda: a.create_function(FunctionName="z", Runtime="wasi-preview1", Role=role,
                                       Handler="function.wasm", Code={"ZipFile": b"not a zip"}))
expect_error("a traversal zip is refused", "InvalidZipFileException",
             lambda: a.create_function(FunctionName="t", Runtime="wasi-preview1", Role=role,
                                       Handler="function.wasm", Code={"ZipFile": zipped("../x.wasm", wasm)}))
refused = expect_error("a Linux runtime on a worker without --linux-kernel is refused",
                       "InvalidParameterValueException",
                       lambda: a.create_function(FunctionName="l", Runtime="provided.al2023", Role=role,
                                                 Handler="bootstrap", Code={"ZipFile": code}))
check("the refusal says a Linux guest is missing", refused and "needs a Linux guest" in str(refused), refused)

r = a.invoke(FunctionName="echo", Payload=b'{"n":1}', LogType="Tail")
body = r["Payload"].read()
check("cold invoke answers", body == b'{"echo":{"n":1}}', body)
check("cold invoke: status 200, version", r["StatusCode"] == 200 and r["ExecutedVersion"] == "$LATEST", r)
log = base64.b64decode(r["LogResult"]).decode()
check("the log tail has START, END and REPORT with Init Duration",
      "START RequestId:" in log and "END RequestId:" in log and "Init Duration:" in log, log)
check("the function's stderr is in the log", "echo: handling an event" in log, log)
def environ_of(**kw):
    r = a.invoke(Payload=b'"env"', **kw)
    return dict(line.split("=", 1) for line in r["Payload"].read().decode().splitlines())


e = environ_of(FunctionName="echo")
check("the function gets its name, version, memory, region and handler",
      (e["AWS_LAMBDA_FUNCTION_NAME"], e["AWS_LAMBDA_FUNCTION_VERSION"], e["AWS_LAMBDA_FUNCTION_MEMORY_SIZE"],
       e["AWS_REGION"], e["_HANDLER"], e["AWS_LAMBDA_RUNTIME_API"])
      == ("echo", "$LATEST", "128", "local", "function.wasm", "127.0.0.1:9001"), e)
check("and the user's variables", e.get("GREETING") == "hello", e)
check("an on-demand environment says so", e["AWS_LAMBDA_INITIALIZATION_TYPE"] == "on-demand", e)
check("the execution role's credentials are temporary ones",
      e["AWS_ACCESS_KEY_ID"].startswith("ASIA") and e["AWS_SESSION_TOKEN"], e)
as_role = client(e["AWS_ACCESS_KEY_ID"], e["AWS_SECRET_ACCESS_KEY"], token=e["AWS_SESSION_TOKEN"])
names = [f["FunctionName"] for f in as_role.list_functions()["Functions"]]
check("they sign requests for the function's account", "echo" in names, names)
forged = client(e["AWS_ACCESS_KEY_ID"], e["AWS_SECRET_ACCESS_KEY"], token=e["AWS_SESSION_TOKEN"][:-2] + "AA")
expect_error("a tampered session token is refused", "UnrecognizedClientException",
             lambda: forged.list_functions())
expect_error("a reserved variable name is refused", "InvalidParameterValueException",
             lambda: a.update_function_configuration(FunctionName="echo",
                                                     Environment={"Variables": {"AWS_REGION": "x"}}))
role_key = e["AWS_ACCESS_KEY_ID"]

r = a.invoke(FunctionName="echo", Payload=b'{"n":2}', LogType="Tail")
log = base64.b64decode(r["LogResult"]).decode()
check("warm invoke answers", r["Payload"].read() == b'{"echo":{"n":2}}')
check("a warm invoke has no Init Duration", "REPORT" in log and "Init Duration" not in log, log)

v1 = a.publish_version(FunctionName="echo")
check("publish makes version 1", v1["Version"] == "1", v1)
check("publishing unchanged code returns the same version",
      a.publish_version(FunctionName="echo")["Version"] == "1")
a.update_function_configuration(FunctionName="echo", Timeout=6)
v2 = a.publish_version(FunctionName="echo")
check("a changed configuration publishes version 2", v2["Version"] == "2", v2)
versions = [v["Version"] for v in a.list_versions_by_function(FunctionName="echo")["Versions"]]
check("versions are listed", versions == ["$LATEST", "1", "2"], versions)

for q in ["1", "2"]:
    r = a.invoke(FunctionName="echo", Qualifier=q, Payload=b'{"v":' + q.encode() + b"}")
    check(f"version {q} answers", r["ExecutedVersion"] == q and r["Payload"].read() == b'{"echo":{"v":' + q.encode() + b"}}", r)

alias = a.create_alias(FunctionName="echo", Name="prod", FunctionVersion="1")
check("alias created", alias["AliasArn"].endswith(":echo:prod"), alias)
r = a.invoke(FunctionName="echo", Qualifier="prod", Payload=b"{}")
check("alias invoke runs its version", r["ExecutedVersion"] == "1", r)
a.update_alias(FunctionName="echo", Name="prod", FunctionVersion="2")
r = a.invoke(FunctionName=created["FunctionArn"] + ":prod", Payload=b"{}")
check("an updated alias (by ARN) runs the new version", r["ExecutedVersion"] == "2", r)
check("get_alias", a.get_alias(FunctionName="echo", Name="prod")["FunctionVersion"] == "2")

put = a.put_provisioned_concurrency_config(FunctionName="echo", Qualifier="prod",
                                          ProvisionedConcurrentExecutions=1)
check("put provisioned concurrency", put["RequestedProvisionedConcurrentExecutions"] == 1
      and put["Status"] in ("IN_PROGRESS", "READY"), put)
got = wait_until_ready("prod")
check("provisioned concurrency becomes READY", got["Status"] == "READY"
      and got["AvailableProvisionedConcurrentExecutions"] == 1, got)
listed = a.list_provisioned_concurrency_configs(FunctionName="echo")["ProvisionedConcurrencyConfigs"]
check("and is listed", [c["FunctionArn"] for c in listed] == [created["FunctionArn"] + ":prod"], listed)
r = a.invoke(FunctionName="echo", Qualifier="prod", Payload=b"{}", LogType="Tail")
log = base64.b64decode(r["LogResult"]).decode()
check("a provisioned environment reports no Init Duration", "REPORT" in log and "Init Duration" not in log, log)
e = environ_of(FunctionName="echo", Qualifier="prod")
check("a provisioned environment says so", e["AWS_LAMBDA_INITIALIZATION_TYPE"] == "provisioned-concurrency"
      and e["AWS_LAMBDA_FUNCTION_VERSION"] == "2", e)
check("environments with the same role share its cached credentials", e["AWS_ACCESS_KEY_ID"] == role_key, e)
expect_error("provisioned concurrency on $LATEST is refused", "InvalidParameterValueException",
             lambda: a.put_provisioned_concurrency_config(FunctionName="echo", Qualifier="$LATEST",
                                                          ProvisionedConcurrentExecutions=1))
expect_error("a missing config is named", "ProvisionedConcurrencyConfigNotFoundException",
             lambda: a.get_provisioned_concurrency_config(FunctionName="echo", Qualifier="1"))

r = a.invoke(FunctionName="echo", InvocationType="DryRun", Payload=b"{}")
check("DryRun is 204", r["StatusCode"] == 204, r)
r = a.invoke(FunctionName="echo", InvocationType="Event", Payload=b'{"async":true}')
check("Event is 202", r["StatusCode"] == 202, r)
print("event-id:", r["ResponseMetadata"]["HTTPHeaders"]["x-amzn-requestid"])

r = a.invoke(FunctionName="echo", Payload=b'"trap"')
err = json.loads(r["Payload"].read())
check("a trap is a function error", r.get("FunctionError") == "Unhandled" and err["errorType"] == "Runtime.Trap", (r, err))
expect_error("a missing function is not found", "ResourceNotFoundException",
             lambda: a.invoke(FunctionName="nope", Payload=b"{}"))
expect_error("a missing version is not found", "ResourceNotFoundException",
             lambda: a.invoke(FunctionName="echo", Qualifier="9", Payload=b"{}"))
expect_error("a payload that is not JSON is refused", "InvalidRequestContentException",
             lambda: a.invoke(FunctionName="echo", Payload=b"{not json"))
e = expect_error("a 7 MB payload is too large", "RequestTooLargeException",
                 lambda: a.invoke(FunctionName="echo", Payload=b'"' + b"x" * (7 << 20) + b'"'))
check("... with status 413", e.response["ResponseMetadata"]["HTTPStatusCode"] == 413)

expect_error("account B cannot see account A's function", "ResourceNotFoundException",
             lambda: b.get_function(FunctionName=created["FunctionArn"]))
expect_error("account B cannot invoke it by ARN without a policy", "AccessDeniedException",
             lambda: b.invoke(FunctionName=created["FunctionArn"], Payload=b"{}"))
expect_error("nor a function that does not exist (denied alike)", "AccessDeniedException",
             lambda: b.invoke(FunctionName=created["FunctionArn"] + "-nope", Payload=b"{}"))

# A resource-based policy lets account B invoke: on the alias only, then
# on the function; in A's environments, with A's role.
account_b = env["ACCOUNT_B"]
added = a.add_permission(FunctionName="echo", Qualifier="prod", StatementId="b-prod",
                         Action="lambda:InvokeFunction", Principal=account_b)
statement = json.loads(added["Statement"])
check("add_permission returns the statement", statement["Sid"] == "b-prod"
      and statement["Principal"]["AWS"] == f"arn:aws:iam::{account_b}:root"
      and statement["Resource"] == created["FunctionArn"] + ":prod", statement)
r = b.invoke(FunctionName=created["FunctionArn"] + ":prod", Payload=b'{"from":"b"}')
check("account B invokes the alias the policy names",
      r["StatusCode"] == 200 and r["Payload"].read() == b'{"echo":{"from":"b"}}', r)
expect_error("but not the function unqualified", "AccessDeniedException",
             lambda: b.invoke(FunctionName=created["FunctionArn"], Payload=b"{}"))
a.add_permission(FunctionName="echo", StatementId="b-all", Action="lambda:InvokeFunction", Principal=account_b)
r = b.invoke(FunctionName=created["FunctionArn"], Payload=b'"env"')
e = dict(line.split("=", 1) for line in r["Payload"].read().decode().splitlines())
check("with a function-level statement it runs as A's function",
      e["AWS_LAMBDA_FUNCTION_NAME"] == "echo" and e["AWS_LAMBDA_FUNCTION_VERSION"] == "$LATEST", e)
as_role = client(e["AWS_ACCESS_KEY_ID"], e["AWS_SECRET_ACCESS_KEY"], token=e["AWS_SESSION_TOKEN"])
check("with A's execution role", "echo" in [f["FunctionName"] for f in as_role.list_functions()["Functions"]])
policy = json.loads(a.get_policy(FunctionName="echo")["Policy"])
check("get_policy lists the function's statements", [s["Sid"] for s in policy["Statement"]] == ["b-all"], policy)
expect_error("a statement id twice is a conflict", "ResourceConflictException",
             lambda: a.add_permission(FunctionName="echo", StatementId="b-all", Action="lambda:InvokeFunction",
                                      Principal=account_b))
expect_error("a policy on $LATEST is refused", "InvalidParameterValueException",
             lambda: a.add_permission(FunctionName="echo", Qualifier="$LATEST", StatementId="x",
                                      Action="lambda:InvokeFunction", Principal=account_b))
expect_error("account B cannot add a statement to A's function", "ResourceNotFoundException",
             lambda: b.add_permission(FunctionName=created["FunctionArn"], StatementId="self-grant",
                                      Action="lambda:InvokeFunction", Principal=account_b))
a.remove_permission(FunctionName="echo", StatementId="b-all")
a.remove_permission(FunctionName="echo", Qualifier="prod", StatementId="b-prod")
expect_error("once removed, account B is denied again", "AccessDeniedException",
             lambda: b.invoke(FunctionName=created["FunctionArn"], Payload=b"{}"))
expect_error("and the policy is gone", "ResourceNotFoundException", lambda: a.get_policy(FunctionName="echo"))
check("account B lists nothing", b.list_functions()["Functions"] == [])
bad = client(env["KEY_A"], "wrong-secret")
expect_error("a wrong secret is refused", "InvalidSignatureException", lambda: bad.list_functions())

layer = a.publish_layer_version(LayerName="wasm-runtime", Content={"ZipFile": zipped("layered.wasm", wasm)},
                                CompatibleRuntimes=["wasi-preview1"], Description="the echo module")
check("publish a layer version", layer["Version"] == 1 and layer["LayerVersionArn"].endswith(":layer:wasm-runtime:1"),
      layer)
check("publishing again makes version 2", a.publish_layer_version(
    LayerName="wasm-runtime", Content={"ZipFile": zipped("layered.wasm", wasm)})["Version"] == 2)
listed = [v["Version"] for v in a.list_layer_versions(LayerName="wasm-runtime")["LayerVersions"]]
check("layer versions are listed newest first", listed == [2, 1], listed)
got = a.get_layer_version(LayerName="wasm-runtime", VersionNumber=1)
check("get_layer_version", got["Description"] == "the echo module"
      and got["Content"]["CodeSha256"] == layer["Content"]["CodeSha256"], got)
got = a.get_layer_version_by_arn(Arn=layer["LayerVersionArn"])
check("get_layer_version_by_arn", got["Version"] == 1 and got["LayerVersionArn"] == layer["LayerVersionArn"], got)
layered = a.create_function(FunctionName="layered", Runtime="wasi-preview1", Role=role, Handler="layered.wasm",
                            Code={"ZipFile": zipped("README", b"the module is in the layer")},
                            Layers=[layer["LayerVersionArn"]])
check("a function takes layers", [l["Arn"] for l in layered["Layers"]] == [layer["LayerVersionArn"]], layered)
r = a.invoke(FunctionName="layered", Payload=b'{"from":"layer"}')
check("and runs the handler its layer provides", r["Payload"].read() == b'{"echo":{"from":"layer"}}')
expect_error("a missing layer version is refused", "InvalidParameterValueException",
             lambda: a.update_function_configuration(FunctionName="layered",
                                                     Layers=[layer["LayerArn"] + ":9"]))
expect_error("another account's layer is refused", "AccessDeniedException",
             lambda: b.create_function(FunctionName="thief", Runtime="wasi-preview1",
                                       Role="arn:aws:iam::222222222222:role/r", Handler="layered.wasm",
                                       Code={"ZipFile": zipped("README", b"x")}, Layers=[layer["LayerVersionArn"]]))

a.put_function_concurrency(FunctionName="echo", ReservedConcurrentExecutions=0)
check("get_function_concurrency reads the reservation",
      a.get_function_concurrency(FunctionName="echo").get("ReservedConcurrentExecutions") == 0)
expect_error("reserved concurrency 0 throttles", "TooManyRequestsException",
             lambda: a.invoke(FunctionName="echo", Payload=b"{}"))
a.delete_function_concurrency(FunctionName="echo")
check("removing the reservation lets it run again",
      a.invoke(FunctionName="echo", Payload=b"{}")["StatusCode"] == 200)
check("and get_function_concurrency then has none",
      "ReservedConcurrentExecutions" not in a.get_function_concurrency(FunctionName="echo"))

# Every List call pages: MaxItems and Marker in, NextMarker out, and
# boto3's paginators read each item once.
for i in range(3):
    a.create_function(FunctionName=f"page-{i}", Runtime="wasi-preview1", Role=role, Handler="function.wasm",
                      Code={"ZipFile": code})
first = a.list_functions(MaxItems=1)
check("ListFunctions(MaxItems=1) gives one function and a NextMarker",
      len(first["Functions"]) == 1 and first.get("NextMarker"), first)
second = a.list_functions(MaxItems=1, Marker=first["NextMarker"])
check("and its NextMarker the next one", second["Functions"][0]["FunctionName"] > first["Functions"][0]["FunctionName"],
      (first, second))
names = [f["FunctionName"] for page in a.get_paginator("list_functions").paginate(PaginationConfig={"PageSize": 2})
         for f in page["Functions"]]
check("a paginator reads every function once, in order",
      names == sorted(set(names)) and {"echo", "layered", "page-0", "page-1", "page-2"} == set(names), names)
last = a.list_functions(MaxItems=50)
check("the last page has no NextMarker", "NextMarker" not in last and len(last["Functions"]) == len(names), last)
versions = [v["Version"] for page in a.get_paginator("list_versions_by_function").paginate(
    FunctionName="echo", PaginationConfig={"PageSize": 1}) for v in page["Versions"]]
check("versions page one at a time", versions == ["$LATEST", "1", "2"], versions)
listed = [v["Version"] for page in a.get_paginator("list_layer_versions").paginate(
    LayerName="wasm-runtime", PaginationConfig={"PageSize": 1}) for v in page["LayerVersions"]]
check("layer versions page newest first", listed == [2, 1], listed)
a.publish_layer_version(LayerName="other-runtime", Content={"ZipFile": zipped("x.wasm", wasm)},
                        CompatibleRuntimes=["provided.al2023"])
layers = a.list_layers()["Layers"]
check("list_layers gives each layer with its newest version",
      [(l["LayerName"], l["LatestMatchingVersion"]["Version"]) for l in layers]
      == [("other-runtime", 1), ("wasm-runtime", 2)], layers)
layers = a.list_layers(CompatibleRuntime="wasi-preview1")["Layers"]
check("list_layers by runtime gives the newest compatible version",
      [(l["LayerName"], l["LatestMatchingVersion"]["Version"]) for l in layers] == [("wasm-runtime", 1)], layers)
expect_error("a Marker this API did not give is refused", "InvalidParameterValueException",
             lambda: a.list_functions(Marker="%%%"))
expect_error("MaxItems over ListLayerVersions' 50 is refused", "InvalidParameterValueException",
             lambda: a_unchecked.list_layer_versions(LayerName="wasm-runtime", MaxItems=51))

# DeleteLayerVersion: the versions are gone from the API, their numbers
# are not given again, and the function that uses one keeps working.
for n in [1, 2]:
    r = a.delete_layer_version(LayerName="wasm-runtime", VersionNumber=n)
    check(f"delete_layer_version {n} is 204", r["ResponseMetadata"]["HTTPStatusCode"] == 204, r)
a.delete_layer_version(LayerName="wasm-runtime", VersionNumber=1)
print("ok   deleting a deleted layer version again does nothing")
expect_error("a deleted layer version cannot be read", "ResourceNotFoundException",
             lambda: a.get_layer_version(LayerName="wasm-runtime", VersionNumber=1))
check("nor is it listed", a.list_layer_versions(LayerName="wasm-runtime")["LayerVersions"] == [])
expect_error("nor added to a function", "InvalidParameterValueException",
             lambda: a.update_function_configuration(FunctionName="layered", Layers=[layer["LayerVersionArn"]]))
# A new configuration: the next invocation is a cold start, which reads
# the deleted layer's code.
a.update_function_configuration(FunctionName="layered", Description="after the layer's deletion")
r = a.invoke(FunctionName="layered", Payload=b'{"deleted":"layer"}', LogType="Tail")
log = base64.b64decode(r["LogResult"]).decode()
check("a function using a deleted layer version still cold-starts and runs",
      r["Payload"].read() == b'{"echo":{"deleted":"layer"}}' and "Init Duration" in log, log)
check("and still lists it", [l["Arn"] for l in a.get_function(FunctionName="layered")["Configuration"]["Layers"]]
      == [layer["LayerVersionArn"]])
again = a.publish_layer_version(LayerName="wasm-runtime", Content={"ZipFile": zipped("layered.wasm", wasm)})
check("the next version after deleted ones takes a new number", again["Version"] == 3, again)

a.create_alias(FunctionName="echo", Name="canary", FunctionVersion="1")
aliases = [x["Name"] for x in a.list_aliases(FunctionName="echo")["Aliases"]]
check("list_aliases", aliases == ["canary", "prod"], aliases)
aliases = [x["Name"] for x in a.list_aliases(FunctionName="echo", FunctionVersion="2")["Aliases"]]
check("list_aliases of one version", aliases == ["prod"], aliases)
page = a.list_aliases(FunctionName="echo", MaxItems=1)
check("list_aliases pages", len(page["Aliases"]) == 1 and page.get("NextMarker"), page)
a.delete_alias(FunctionName="echo", Name="canary")
expect_error("a deleted alias is gone", "ResourceNotFoundException",
             lambda: a.get_alias(FunctionName="echo", Name="canary"))
check("and no longer listed", [x["Name"] for x in a.list_aliases(FunctionName="echo")["Aliases"]] == ["prod"])

# A weighted alias: invocations split between two versions by weight,
# ExecutedVersion says which ran, provisioned concurrency follows the
# weights. A function of its own, never invoked on demand, so that every
# invocation below lands on a provisioned environment.
a.create_function(FunctionName="canary", Runtime="wasi-preview1", Role=role, Handler="function.wasm",
                  Code={"ZipFile": code})
a.publish_version(FunctionName="canary")
a.update_function_configuration(FunctionName="canary", Timeout=4)
a.publish_version(FunctionName="canary")
weighted = a.create_alias(FunctionName="canary", Name="live", FunctionVersion="1",
                          RoutingConfig={"AdditionalVersionWeights": {"2": 0.5}})
check("an alias takes a routing config", weighted["RoutingConfig"]["AdditionalVersionWeights"] == {"2": 0.5},
      weighted)
for bad, config in [("a weight over 1", {"2": 1.5}), ("its own version", {"1": 0.5}),
                    ("a missing version", {"9": 0.5}), ("two versions", {"2": 0.1, "3": 0.1})]:
    expect_error(f"a routing config with {bad} is refused",
                 "ResourceNotFoundException" if bad == "a missing version" else "InvalidParameterValueException",
                 lambda: a.update_alias(FunctionName="canary", Name="live",
                                        RoutingConfig={"AdditionalVersionWeights": config}))
a.put_provisioned_concurrency_config(FunctionName="canary", Qualifier="live", ProvisionedConcurrentExecutions=2)
deadline = time.time() + 30
while (got := a.get_provisioned_concurrency_config(FunctionName="canary", Qualifier="live"))["Status"] != "READY" \
        and time.time() < deadline:
    time.sleep(0.05)
check("provisioned concurrency on the weighted alias becomes READY",
      got["Status"] == "READY" and got["AllocatedProvisionedConcurrentExecutions"] == 2, got)
ran = {}
for i in range(40):
    r = a.invoke(FunctionName="canary", Qualifier="live", Payload=b'"env"')
    e = dict(line.split("=", 1) for line in r["Payload"].read().decode().splitlines())
    check(f"the alias's invocation {i} runs the version it reports",
          e["AWS_LAMBDA_FUNCTION_VERSION"] == r["ExecutedVersion"], (e, r))
    check(f"on that version's provisioned environment ({i})",
          e["AWS_LAMBDA_INITIALIZATION_TYPE"] == "provisioned-concurrency", e)
    ran[r["ExecutedVersion"]] = ran.get(r["ExecutedVersion"], 0) + 1
# At weight 0.5, fewer than 8 of 40 on either side has odds under 1 in 10^5.
check("a 50/50 alias runs both versions about equally", ran.get("1", 0) >= 8 and ran.get("2", 0) >= 8, ran)
a.update_alias(FunctionName="canary", Name="live", RoutingConfig={"AdditionalVersionWeights": {}})
versions = {a.invoke(FunctionName="canary", Qualifier="live", Payload=b"{}")["ExecutedVersion"] for _ in range(10)}
check("an emptied routing config runs the alias's version only", versions == {"1"}, versions)
check("and the alias no longer shows one",
      "RoutingConfig" not in a.get_alias(FunctionName="canary", Name="live")
      or not a.get_alias(FunctionName="canary", Name="live")["RoutingConfig"].get("AdditionalVersionWeights"))

# SnapStart: a function's published versions are initialized and
# snapshotted when published (Pending until then) and their cold starts
# restore; $LATEST and functions without it boot every environment.
def tail(r):
    return base64.b64decode(r["LogResult"]).decode()


def two_at_once(**kw):
    """Two invocations at once: the second needs an environment of its own."""
    with ThreadPoolExecutor(2) as pool:
        return list(pool.map(lambda _: tail(a.invoke(Payload=b'"spin"', LogType="Tail", **kw)), range(2)))


check("a function without SnapStart says so",
      a.get_function_configuration(FunctionName="echo")["SnapStart"] == {"ApplyOn": "None", "OptimizationStatus": "Off"})
a.create_function(FunctionName="plain", Runtime="wasi-preview1", Role=role, Handler="function.wasm",
                  Code={"ZipFile": code})
a.publish_version(FunctionName="plain")
check("a version without SnapStart boots", "Init Duration" in tail(a.invoke(FunctionName="plain", Qualifier="1",
                                                                            Payload=b"{}", LogType="Tail")))
time.sleep(1)  # time enough to seal a snapshot, were one taken
cold = [log for log in two_at_once(FunctionName="plain", Qualifier="1") if "Duration: " in log
        and ("Init Duration" in log or "Restore Duration" in log)]
check("and boots its next environment too (no snapshot of it)", len(cold) == 1 and "Init Duration" in cold[0], cold)

snap = a.create_function(FunctionName="snap", Runtime="wasi-preview1", Role=role, Handler="function.wasm",
                         Code={"ZipFile": code}, SnapStart={"ApplyOn": "PublishedVersions"})
check("CreateFunction takes SnapStart; $LATEST is not optimized",
      snap["SnapStart"] == {"ApplyOn": "PublishedVersions", "OptimizationStatus": "Off"}, snap)
expect_error("an unknown ApplyOn is refused", "InvalidParameterValueException",
             lambda: a.update_function_configuration(FunctionName="snap", SnapStart={"ApplyOn": "Always"}))
v = a.publish_version(FunctionName="snap")
check("its published version is optimized, Pending until its snapshot is taken",
      v["SnapStart"] == {"ApplyOn": "PublishedVersions", "OptimizationStatus": "On"}
      and v["State"] in ("Pending", "Active"), v)
a.get_waiter("published_version_active").wait(FunctionName="snap", Qualifier="1",
                                              WaiterConfig={"Delay": 1, "MaxAttempts": 60})
got = a.get_function_configuration(FunctionName="snap", Qualifier="1")
check("then Active", got["State"] == "Active" and "StateReason" not in got, got)
r = a.invoke(FunctionName="snap", Qualifier="1", Payload=b'"env"', LogType="Tail")
log = tail(r)
check("its first invocation restores the snapshot", "Restore Duration" in log and "Init Duration" not in log, log)
e = dict(line.split("=", 1) for line in r["Payload"].read().decode().splitlines())
check("in an environment that says snap-start", e["AWS_LAMBDA_INITIALIZATION_TYPE"] == "snap-start"
      and e["AWS_LAMBDA_FUNCTION_VERSION"] == "1", e)
cold = [log for log in two_at_once(FunctionName="snap", Qualifier="1") if "Restore Duration" in log
        or "Init Duration" in log]
check("a second environment of it restores too", len(cold) == 1 and "Restore Duration" in cold[0], cold)
check("$LATEST boots", "Init Duration" in tail(a.invoke(FunctionName="snap", Payload=b"{}", LogType="Tail")))
expect_error("provisioned concurrency on a SnapStart version is refused", "InvalidParameterValueException",
             lambda: a.put_provisioned_concurrency_config(FunctionName="snap", Qualifier="1",
                                                          ProvisionedConcurrentExecutions=1))
a.update_function_code(FunctionName="snap", ZipFile=zipped("function.wasm", b"\0asm not a module"))
broken = a.publish_version(FunctionName="snap")
try:
    a.get_waiter("published_version_active").wait(FunctionName="snap", Qualifier=broken["Version"],
                                                  WaiterConfig={"Delay": 1, "MaxAttempts": 60})
except botocore.exceptions.WaiterError:
    pass
got = a.get_function_configuration(FunctionName="snap", Qualifier=broken["Version"])
check("a version whose init fails ends Failed, saying why", got["State"] == "Failed"
      and "Runtime.InvalidFunction" in got.get("StateReason", "") and got["StateReasonCode"] == "FunctionError", got)
expect_error("and cannot be invoked", "ResourceConflictException",
             lambda: a.invoke(FunctionName="snap", Qualifier=broken["Version"], Payload=b"{}"))

# Tags: on CreateFunction, TagResource, UntagResource, ListTags, and in
# GetFunction.
tagged = a.create_function(FunctionName="tagged", Runtime="wasi-preview1", Role=role, Handler="function.wasm",
                           Code={"ZipFile": code}, Tags={"team": "platform"})
arn = tagged["FunctionArn"]
check("CreateFunction's tags are listed", a.list_tags(Resource=arn)["Tags"] == {"team": "platform"})
a.tag_resource(Resource=arn, Tags={"stage": "prod", "cost-center": "42"})
check("tag_resource adds tags", a.list_tags(Resource=arn)["Tags"]
      == {"team": "platform", "stage": "prod", "cost-center": "42"})
a.untag_resource(Resource=arn, TagKeys=["team", "cost-center"])
check("untag_resource removes the keys it names", a.list_tags(Resource=arn)["Tags"] == {"stage": "prod"})
check("get_function shows them", a.get_function(FunctionName="tagged")["Tags"] == {"stage": "prod"})
expect_error("an aws: tag key is refused", "InvalidParameterValueException",
             lambda: a.tag_resource(Resource=arn, Tags={"aws:owner": "me"}))
expect_error("tags on a qualified ARN are refused", "InvalidParameterValueException",
             lambda: a.tag_resource(Resource=arn + ":1", Tags={"k": "v"}))
expect_error("another account cannot tag it", "ResourceNotFoundException",
             lambda: b.tag_resource(Resource=arn, Tags={"k": "v"}))

# Asynchronous invocation configs: retries, event age, and destination
# functions for records of events that succeeded or failed for good.
dest = {}
for name in ["successes", "failures"]:
    dest[name] = a.create_function(FunctionName=name, Runtime="wasi-preview1", Role=role,
                                   Handler="function.wasm", Code={"ZipFile": code})["FunctionArn"]
put = a.put_function_event_invoke_config(
    FunctionName="echo", MaximumRetryAttempts=0, MaximumEventAgeInSeconds=600,
    DestinationConfig={"OnSuccess": {"Destination": dest["successes"]},
                       "OnFailure": {"Destination": dest["failures"]}})
check("put_function_event_invoke_config", put["MaximumRetryAttempts"] == 0
      and put["FunctionArn"].endswith(":echo:$LATEST")
      and put["DestinationConfig"]["OnFailure"]["Destination"] == dest["failures"], put)
updated = a.update_function_event_invoke_config(FunctionName="echo", MaximumRetryAttempts=1)
check("update keeps what it does not name", updated["MaximumRetryAttempts"] == 1
      and updated["MaximumEventAgeInSeconds"] == 600
      and updated["DestinationConfig"]["OnSuccess"]["Destination"] == dest["successes"], updated)
check("get_function_event_invoke_config",
      a.get_function_event_invoke_config(FunctionName="echo")["MaximumRetryAttempts"] == 1)
listed = a.list_function_event_invoke_configs(FunctionName="echo")["FunctionEventInvokeConfigs"]
check("list_function_event_invoke_configs", [c["FunctionArn"] for c in listed] == [put["FunctionArn"]], listed)
expect_error("MaximumRetryAttempts over 2 is refused", "InvalidParameterValueException",
             lambda: a_unchecked.put_function_event_invoke_config(FunctionName="echo", MaximumRetryAttempts=5))
expect_error("a destination in another account is refused", "InvalidParameterValueException",
             lambda: a.put_function_event_invoke_config(FunctionName="echo", DestinationConfig={
                 "OnFailure": {"Destination": "arn:aws:lambda:local:222222222222:function:x"}}))
expect_error("a config of a function without one is not found", "ResourceNotFoundException",
             lambda: a.get_function_event_invoke_config(FunctionName="successes"))
r = a.invoke(FunctionName="echo", InvocationType="Event", Payload=b'"trap"')
print("failed-event-id:", r["ResponseMetadata"]["HTTPHeaders"]["x-amzn-requestid"])
r = a.invoke(FunctionName="echo", InvocationType="Event", Payload=b'{"fine":true}')
print("succeeded-event-id:", r["ResponseMetadata"]["HTTPHeaders"]["x-amzn-requestid"])

settings = a.get_account_settings()
check("get_account_settings counts the account's functions and code",
      settings["AccountUsage"]["FunctionCount"] == 11 and settings["AccountUsage"]["TotalCodeSize"] > 5 * len(code)
      and settings["AccountLimit"]["ConcurrentExecutions"] >= 1
      and settings["AccountLimit"]["CodeSizeZipped"] == 50 * 1024 * 1024, settings)
check("another account's usage is its own", b.get_account_settings()["AccountUsage"]["FunctionCount"] == 0)
expect_error("an operation this worker does not serve is UnknownOperationException", "UnknownOperationException",
             lambda: a.list_function_url_configs(FunctionName="echo"))

got = a.get_function(FunctionName="echo")
check("get_function", got["Configuration"]["FunctionName"] == "echo" and got["Configuration"]["Timeout"] == 6, got)
print("all checks passed")
