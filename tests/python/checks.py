"""What every client script prints: one line per check, each with the
seconds since the script started; the first failed one ends the script.
And the one-file ZIP the scripts upload."""
import io
import sys
import time
import zipfile

import botocore

started = time.time()


def check(name, cond, detail=""):
    if not cond:
        print(f"FAIL {name}: {detail}")
        sys.exit(1)
    print(f"ok   {name} ({time.time() - started:.0f} s)", flush=True)


def expect_error(name, code, fn):
    """Calls `fn`, which must fail with the AWS error `code`; the error."""
    try:
        fn()
    except botocore.exceptions.ClientError as e:
        got = e.response["Error"]["Code"]
        check(name, got == code, f"got {got}: {e}")
        return e
    check(name, False, "no error")


def zipped(name, data):
    """A ZIP holding one file, `name`."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr(name, data)
    return buf.getvalue()
