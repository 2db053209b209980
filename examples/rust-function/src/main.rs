//! A Lambda function on the official `lambda_runtime` crate, built as a
//! static `bootstrap`: it echoes its event, logs a line on stdout and one
//! on stderr per event, fails with its own error type when the event
//! asks it to, answers `{"random": true}` with 16 bytes from the
//! kernel's random generator (clones of one snapshot must differ),
//! describes how it was started on `{"describe": true}` (its arguments,
//! working directory, `_HANDLER` and `GREETING`: what a container image
//! and its ImageConfig decide), and exits with status N on `{"exit": N}`,
//! as a crashing runtime would.

use lambda_runtime::{service_fn, Diagnostic, LambdaEvent};
use serde_json::{json, Value};

/// The error the function reports for `{"fail": "..."}`.
#[derive(Debug)]
struct Refused(String);

impl From<Refused> for Diagnostic {
    fn from(e: Refused) -> Diagnostic {
        Diagnostic {
            error_type: "Function.Refused".into(),
            error_message: e.0,
        }
    }
}

async fn handle(event: LambdaEvent<Value>) -> Result<Value, Refused> {
    println!("handling request {}", event.context.request_id);
    eprintln!("function region {:?}", std::env::var("AWS_REGION").ok());
    if let Some(code) = event.payload.get("exit").and_then(Value::as_i64) {
        std::process::exit(code as i32);
    }
    if event.payload.get("random") == Some(&Value::Bool(true)) {
        return Ok(json!({ "random": random_hex() }));
    }
    if event.payload.get("describe") == Some(&Value::Bool(true)) {
        return Ok(json!({
            "args": std::env::args().collect::<Vec<_>>(),
            "cwd": std::env::current_dir().map(|d| d.display().to_string()).unwrap_or_default(),
            "handler": std::env::var("_HANDLER").ok(),
            "greeting": std::env::var("GREETING").ok(),
        }));
    }
    match event.payload.get("fail").and_then(Value::as_str) {
        Some(reason) => Err(Refused(reason.to_string())),
        None => Ok(json!({ "echo": event.payload })),
    }
}

/// 16 bytes of /dev/urandom, in hex.
fn random_hex() -> String {
    use std::io::Read;
    let mut bytes = [0u8; 16];
    if let Err(e) = std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut bytes)) {
        return format!("cannot read /dev/urandom: {e}");
    }
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), lambda_runtime::Error> {
    lambda_runtime::run(service_fn(handle)).await
}
