//! A client for the AWS Lambda Runtime API (`/2018-06-01/runtime/...`):
//! long-poll for the next invocation, then post its response or error.

use alloc::format;
use alloc::string::{String, ToString};
use alloc::vec::Vec;
use core::fmt;

use crate::http::{ByteStream, Connection, HttpError, Response};

const NEXT: &str = "/2018-06-01/runtime/invocation/next";
const INIT_ERROR: &str = "/2018-06-01/runtime/init/error";
const ERROR_TYPE_HEADER: &str = "Lambda-Runtime-Function-Error-Type";
/// Longest request id accepted from the host.
const MAX_REQUEST_ID: usize = 128;

/// One event to handle.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invocation {
    pub request_id: String,
    /// Wall-clock deadline, milliseconds since the epoch.
    pub deadline_ms: Option<u64>,
    /// Time left when the host answered, for guests without a wall clock
    /// (`X-Microvm-Remaining-Ms`, sent by this project's host).
    pub remaining_ms: Option<u64>,
    pub function_arn: Option<String>,
    pub trace_id: Option<String>,
    pub payload: Vec<u8>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RuntimeError {
    Http(HttpError),
    /// The API answered with an unexpected status.
    Status {
        status: u16,
        body: String,
    },
    /// `/next` gave no usable request id.
    BadRequestId(String),
}

impl fmt::Display for RuntimeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RuntimeError::Http(e) => write!(f, "{e}"),
            RuntimeError::Status { status, body } => write!(f, "status {status}: {body}"),
            RuntimeError::BadRequestId(id) => write!(f, "unusable request id {id:?}"),
        }
    }
}

impl From<HttpError> for RuntimeError {
    fn from(e: HttpError) -> Self {
        RuntimeError::Http(e)
    }
}

/// Quotes a string for JSON.
pub fn json_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// The body Lambda expects with an error: `{"errorMessage", "errorType"}`.
pub fn error_body(error_type: &str, message: &str) -> String {
    format!(
        "{{\"errorMessage\":{},\"errorType\":{}}}",
        json_string(message),
        json_string(error_type)
    )
}

pub struct RuntimeClient<S> {
    http: Connection<S>,
}

fn expect(response: Response, wanted: u16) -> Result<Response, RuntimeError> {
    if response.status == wanted {
        Ok(response)
    } else {
        Err(RuntimeError::Status {
            status: response.status,
            body: String::from_utf8_lossy(&response.body).into_owned(),
        })
    }
}

impl<S: ByteStream> RuntimeClient<S> {
    pub fn new(stream: S) -> Self {
        RuntimeClient {
            http: Connection::new(stream),
        }
    }

    /// Waits for the next invocation.
    pub fn next_invocation(&mut self) -> Result<Invocation, RuntimeError> {
        self.ask_next()?;
        self.await_next()
    }

    /// Asks for the next invocation without waiting for it, so that the
    /// runtime can work while the host answers; [`await_next`] takes the
    /// answer, and no other request may come between.
    ///
    /// [`await_next`]: RuntimeClient::await_next
    pub fn ask_next(&mut self) -> Result<(), RuntimeError> {
        Ok(self.http.send("GET", NEXT, &[], &[])?)
    }

    /// Waits for the invocation [`ask_next`](RuntimeClient::ask_next)
    /// asked for.
    pub fn await_next(&mut self) -> Result<Invocation, RuntimeError> {
        let r = expect(self.http.read_response()?, 200)?;
        let id = r
            .header("lambda-runtime-aws-request-id")
            .unwrap_or("")
            .to_string();
        let safe = !id.is_empty()
            && id.len() <= MAX_REQUEST_ID
            && id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if !safe {
            return Err(RuntimeError::BadRequestId(id));
        }
        let number = |name: &str| r.header(name).and_then(|v| v.trim().parse::<u64>().ok());
        Ok(Invocation {
            deadline_ms: number("lambda-runtime-deadline-ms"),
            remaining_ms: number("x-microvm-remaining-ms"),
            function_arn: r
                .header("lambda-runtime-invoked-function-arn")
                .map(String::from),
            trace_id: r.header("lambda-runtime-trace-id").map(String::from),
            request_id: id,
            payload: r.body,
        })
    }

    pub fn respond(&mut self, request_id: &str, body: &[u8]) -> Result<(), RuntimeError> {
        let path = format!("/2018-06-01/runtime/invocation/{request_id}/response");
        expect(self.http.request("POST", &path, &[], body)?, 202).map(|_| ())
    }

    pub fn error(
        &mut self,
        request_id: &str,
        error_type: &str,
        message: &str,
    ) -> Result<(), RuntimeError> {
        let path = format!("/2018-06-01/runtime/invocation/{request_id}/error");
        let body = error_body(error_type, message);
        let headers = [
            (ERROR_TYPE_HEADER, error_type),
            ("Content-Type", "application/json"),
        ];
        expect(
            self.http
                .request("POST", &path, &headers, body.as_bytes())?,
            202,
        )
        .map(|_| ())
    }

    pub fn init_error(&mut self, error_type: &str, message: &str) -> Result<(), RuntimeError> {
        let body = error_body(error_type, message);
        let headers = [
            (ERROR_TYPE_HEADER, error_type),
            ("Content-Type", "application/json"),
        ];
        expect(
            self.http
                .request("POST", INIT_ERROR, &headers, body.as_bytes())?,
            202,
        )
        .map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::StreamError;

    struct Scripted {
        replies: Vec<u8>,
        sent: Vec<u8>,
    }

    impl ByteStream for Scripted {
        fn read(&mut self, buf: &mut [u8]) -> Result<usize, StreamError> {
            let n = buf.len().min(self.replies.len());
            buf[..n].copy_from_slice(&self.replies[..n]);
            self.replies.drain(..n);
            Ok(n)
        }
        fn write_all(&mut self, data: &[u8]) -> Result<(), StreamError> {
            self.sent.extend_from_slice(data);
            Ok(())
        }
    }

    fn client(replies: &str) -> RuntimeClient<Scripted> {
        RuntimeClient::new(Scripted {
            replies: replies.as_bytes().to_vec(),
            sent: Vec::new(),
        })
    }

    #[test]
    fn next_reads_the_invocation_headers_and_payload() {
        let mut c = client(
            "HTTP/1.1 200 OK\r\nLambda-Runtime-Aws-Request-Id: 8476a536-e9f4\r\n\
             Lambda-Runtime-Deadline-Ms: 1542409706888\r\nX-Microvm-Remaining-Ms: 3000\r\n\
             Lambda-Runtime-Invoked-Function-Arn: arn:aws:lambda:us-east-1:1:function:f\r\n\
             Lambda-Runtime-Trace-Id: Root=1-5bef4de7\r\nContent-Length: 13\r\n\r\n{\"key\":\"v1\"}\n",
        );
        let inv = c.next_invocation().unwrap();
        assert_eq!(inv.request_id, "8476a536-e9f4");
        assert_eq!(inv.deadline_ms, Some(1542409706888));
        assert_eq!(inv.remaining_ms, Some(3000));
        assert_eq!(
            inv.function_arn.as_deref(),
            Some("arn:aws:lambda:us-east-1:1:function:f")
        );
        assert_eq!(inv.payload, b"{\"key\":\"v1\"}\n");
        let sent = String::from_utf8(c.http_stream_sent()).unwrap();
        assert!(sent.starts_with("GET /2018-06-01/runtime/invocation/next HTTP/1.1\r\n"));
    }

    #[test]
    fn the_next_request_goes_out_before_its_answer_is_awaited() {
        let mut c = client(
            "HTTP/1.1 200 OK\r\nLambda-Runtime-Aws-Request-Id: r-1\r\nContent-Length: 2\r\n\r\n{}",
        );
        c.ask_next().unwrap();
        let sent = String::from_utf8(c.http_stream_sent()).unwrap();
        assert!(sent.starts_with("GET /2018-06-01/runtime/invocation/next HTTP/1.1\r\n"));
        let inv = c.await_next().unwrap();
        assert_eq!(
            (inv.request_id.as_str(), inv.payload.as_slice()),
            ("r-1", &b"{}"[..])
        );
        assert_eq!(
            c.http_stream_sent().len(),
            sent.len(),
            "nothing more was sent"
        );
    }

    #[test]
    fn unsafe_request_ids_are_refused() {
        for id in ["", "../../etc", "a b", "x/y"] {
            let mut c = client(&format!(
                "HTTP/1.1 200 OK\r\nLambda-Runtime-Aws-Request-Id: {id}\r\nContent-Length: 0\r\n\r\n"
            ));
            assert!(
                matches!(c.next_invocation(), Err(RuntimeError::BadRequestId(_))),
                "{id:?}"
            );
        }
    }

    #[test]
    fn errors_carry_the_type_header_and_a_json_body() {
        let mut c = client("HTTP/1.1 202 Accepted\r\nContent-Length: 0\r\n\r\n");
        c.error("id-1", "Runtime.Trap", "unreachable \"here\"\n")
            .unwrap();
        let sent = String::from_utf8(c.http_stream_sent()).unwrap();
        assert!(sent.starts_with("POST /2018-06-01/runtime/invocation/id-1/error HTTP/1.1\r\n"));
        assert!(sent.contains("Lambda-Runtime-Function-Error-Type: Runtime.Trap\r\n"));
        assert!(sent.ends_with(
            "{\"errorMessage\":\"unreachable \\\"here\\\"\\n\",\"errorType\":\"Runtime.Trap\"}"
        ));
    }

    #[test]
    fn a_rejected_response_is_an_error() {
        let mut c = client("HTTP/1.1 413 Payload Too Large\r\nContent-Length: 3\r\n\r\nbig");
        assert_eq!(
            c.respond("id", b"x"),
            Err(RuntimeError::Status {
                status: 413,
                body: "big".into()
            })
        );
    }

    impl RuntimeClient<Scripted> {
        fn http_stream_sent(&self) -> Vec<u8> {
            self.http.stream().sent.clone()
        }
    }
}
