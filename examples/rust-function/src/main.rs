//! A Lambda function on the official `lambda_runtime` crate, built as a
//! static `bootstrap`: it echoes its event, logs a line on stdout and one
//! on stderr per event, and fails with its own error type when the event
//! asks it to.

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
    match event.payload.get("fail").and_then(Value::as_str) {
        Some(reason) => Err(Refused(reason.to_string())),
        None => Ok(json!({ "echo": event.payload })),
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), lambda_runtime::Error> {
    lambda_runtime::run(service_fn(handle)).await
}
