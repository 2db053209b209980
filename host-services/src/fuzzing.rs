//! Harnesses for the worker's parsers of bytes a guest or a caller
//! chooses: the Runtime API's requests, the guest's log stream, SigV4
//! signatures (with execution-role session tokens), function ZIPs, and
//! the start-up message the guest's init decodes. The
//! cargo-fuzz targets in `fuzz/` drive them; the tests below run them on
//! well-formed inputs, check what those give, and write them out as the
//! fuzzer's seeds (`MICROVM_FUZZ_SEED_DIR/<target>/`).

use std::io::Cursor;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use axum::http::{HeaderMap, HeaderName, HeaderValue, Method};
use bytes::Bytes;
use guest_init::environ;
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

use crate::artifacts::code::{check_zip, extract, MAX_UNZIPPED_BYTES};
use crate::data_plane::log_stream::{LineSplitter, Lines};
use crate::data_plane::runtime_api::{InvokeError, Outcome, RuntimeApi};
use crate::ids::AccountId;
use crate::security::auth::{sign, AccessKey, Credentials, SignedRequest};
use crate::security::role_credentials::{RoleCredentialIssuer, RoleCredentials};

const FUNCTION_ARN: &str = "arn:aws:lambda:us-east-1:123456789012:function:fuzz";
/// The invocation waiting for the runtime while the input is served.
pub const REQUEST_ID: &str = "8476a536-e9f4-11e8-9739-2dfe598c3fcd";
const EVENT: &[u8] = br#"{"fuzz":true}"#;

/// A listener that accepts one in-memory connection, then none.
struct OneConnection(Option<DuplexStream>);

impl axum::serve::Listener for OneConnection {
    type Io = DuplexStream;
    type Addr = ();

    async fn accept(&mut self) -> (DuplexStream, ()) {
        match self.0.take() {
            Some(stream) => (stream, ()),
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<()> {
        Ok(())
    }
}

/// What the Runtime API made of one connection's bytes.
pub struct RuntimeApiExchange {
    /// Everything the server sent back.
    pub answers: Vec<u8>,
    /// The waiting invocation's outcome, if the bytes ended it.
    pub outcome: Option<Result<Outcome, InvokeError>>,
}

/// Serves `input` as the bytes of one runtime connection (which stays
/// open, as a guest's would) while one invocation waits, until the server
/// has nothing more to say.
pub fn serve_runtime_bytes(input: &[u8]) -> RuntimeApiExchange {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("a current-thread runtime");
    runtime.block_on(async {
        // Room for the whole input, so that writing it never waits on a
        // server that stopped reading.
        let (client, server) = tokio::io::duplex(input.len().max(64 << 10));
        let api = Arc::new(RuntimeApi::serve(OneConnection(Some(server)), FUNCTION_ARN));
        let invoker = tokio::spawn({
            let api = api.clone();
            async move {
                api.invoke(
                    REQUEST_ID,
                    Bytes::from_static(EVENT),
                    Duration::from_secs(60),
                )
                .await
            }
        });
        let (mut from_server, mut to_server) = tokio::io::split(client);
        let answers = Arc::new(Mutex::new(Vec::new()));
        tokio::spawn({
            let answers = answers.clone();
            async move {
                let mut buf = [0u8; 4096];
                while let Ok(n @ 1..) = from_server.read(&mut buf).await {
                    answers.lock().unwrap().extend_from_slice(&buf[..n]);
                }
            }
        });
        to_server.write_all(input).await.expect("the input fits");
        // Every handler answers at once but `/next` without work, so the
        // server is done when a few scheduler rounds bring nothing new.
        let (mut seen, mut idle) = (0, 0);
        while idle < 32 {
            tokio::task::yield_now().await;
            let now = answers.lock().unwrap().len();
            (seen, idle) = if now == seen {
                (seen, idle + 1)
            } else {
                (now, 0)
            };
        }
        let outcome = if invoker.is_finished() {
            Some(invoker.await.expect("the invoking task does not panic"))
        } else {
            None
        };
        let answers = std::mem::take(&mut *answers.lock().unwrap());
        RuntimeApiExchange { answers, outcome }
    })
}

/// Any bytes on a runtime connection get HTTP answers or none, never a
/// panic or a hang.
pub fn runtime_api_requests(input: &[u8]) {
    let exchange = serve_runtime_bytes(input);
    assert!(
        exchange.answers.is_empty() || exchange.answers.starts_with(b"HTTP/1."),
        "not an HTTP answer: {:?}",
        String::from_utf8_lossy(&exchange.answers[..exchange.answers.len().min(64)])
    );
}

/// The lines `bytes` hold by definition: split at `\n` (no line after a
/// final one), each cut to `limit` bytes, trailing `\r`s dropped.
fn expected_lines(bytes: &[u8], limit: usize) -> Vec<String> {
    let mut segments: Vec<&[u8]> = bytes.split(|&b| b == b'\n').collect();
    if segments.last().is_some_and(|s| s.is_empty()) {
        segments.pop();
    }
    segments
        .into_iter()
        .map(|segment| {
            let mut line = &segment[..segment.len().min(limit)];
            while let [rest @ .., b'\r'] = line {
                line = rest;
            }
            String::from_utf8_lossy(line).into_owned()
        })
        .collect()
}

/// The log stream cut into lines however its reads fall: the first byte
/// picks the line limit (1 to 64 bytes, to reach it), the second the
/// size of the reads. The lines are the definition's, the splitter never
/// holds more than the limit, and the function's lines and END markers
/// are told apart.
pub fn log_stream(input: &[u8]) {
    let (limit, read_size, bytes) = match input {
        [limit, read_size, bytes @ ..] => (
            usize::from(limit % 64) + 1,
            usize::from(*read_size) + 1,
            bytes,
        ),
        _ => return,
    };
    let mut splitter = LineSplitter::new(limit);
    let mut lines = Vec::new();
    for read in bytes.chunks(read_size) {
        let mut rest = read;
        while !rest.is_empty() {
            let (used, line) = splitter.feed(rest);
            assert!(used > 0 && used <= rest.len());
            assert!(splitter.pending() <= limit, "the splitter holds too much");
            rest = &rest[used..];
            lines.extend(line);
        }
    }
    lines.extend(splitter.finish());
    assert_eq!(lines, expected_lines(bytes, limit));

    let log = Lines::log_stream();
    for line in &lines {
        log.push(line.clone());
    }
    let end = |l: &String| {
        l.strip_prefix("END RequestId: ")
            .map(|id| id.trim().to_string())
    };
    let function: Vec<String> = lines.iter().filter(|l| end(l).is_none()).cloned().collect();
    assert_eq!(log.take_function_lines(), function);
    assert_eq!(log.ended(), lines.iter().filter_map(end).next_back());
}

const ACCOUNT: &str = "123456789012";

struct Signers {
    credentials: Credentials,
    temporary: RoleCredentials,
}

/// The worker's credential table with one static key and a role
/// credential issuer, made once per process from files it then removes.
fn signers() -> &'static Signers {
    static SIGNERS: OnceLock<Signers> = OnceLock::new();
    SIGNERS.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("host-services-fuzz-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("a temporary directory");
        let table = dir.join("credentials.json");
        std::fs::write(
            &table,
            format!(
                r#"[{{"AccessKeyId":"AKIDFUZZ","SecretAccessKey":"fuzz/secret","AccountId":"{ACCOUNT}"}}]"#
            ),
        )
        .expect("the credentials file");
        let issuer = RoleCredentialIssuer::open(&dir.join("issuer.key"), Duration::from_secs(3600))
            .expect("the issuer's key");
        let temporary = issuer.credentials(
            &AccountId(ACCOUNT.into()),
            "arn:aws:iam::123456789012:role/fuzz",
            Duration::ZERO,
        );
        let credentials = Credentials::load(&table)
            .expect("the credentials file")
            .with_issuer(Arc::new(issuer));
        let _ = std::fs::remove_dir_all(&dir);
        Signers {
            credentials,
            temporary,
        }
    })
}

/// A request as a caller may send it: the first byte says how it is
/// signed, then lines give the method, the raw path, the raw query and
/// `name: value` headers up to an empty line; the rest is the body.
///
/// Unsigned, whatever its Authorization says, it is refused (nobody
/// without the secret gets in); signed by the worker's own signer with
/// the static key or a role's temporary one, it is accepted exactly when
/// it has a `host` header; signed and then changed in its body or path,
/// it is refused.
pub fn signed_request(input: &[u8]) {
    let Some((&how, rest)) = input.split_first() else {
        return;
    };
    let mut fields = rest.splitn(4, |&b| b == b'\n');
    let method = Method::from_bytes(fields.next().unwrap_or_default()).unwrap_or(Method::GET);
    let mut raw_path = String::from_utf8_lossy(fields.next().unwrap_or_default()).into_owned();
    let raw_query = fields
        .next()
        .map(|q| String::from_utf8_lossy(q).into_owned());
    let mut headers = HeaderMap::new();
    let mut rest = fields.next().unwrap_or_default();
    while let Some(end) = rest.iter().position(|&b| b == b'\n') {
        let (line, after) = (&rest[..end], &rest[end + 1..]);
        rest = after;
        if line.is_empty() {
            break;
        }
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            continue;
        };
        if let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(&line[..colon]),
            HeaderValue::from_bytes(line[colon + 1..].trim_ascii()),
        ) {
            headers.append(name, value);
        }
    }
    let mut body = rest.to_vec();
    let has_host = headers.contains_key("host");
    let signers = signers();
    let temporary = &signers.temporary;
    let signed_by = match how % 4 {
        0 => None,
        1 | 3 => Some(("AKIDFUZZ", "fuzz/secret")),
        _ => {
            headers.insert(
                "x-amz-security-token",
                HeaderValue::from_str(&temporary.session_token).expect("a token is a header"),
            );
            Some((
                temporary.access_key_id.as_str(),
                temporary.secret_access_key.as_str(),
            ))
        }
    };
    if let Some((id, secret)) = signed_by {
        let key = AccessKey {
            id,
            secret,
            region: "us-east-1",
        };
        sign(
            &key,
            &method,
            &raw_path,
            raw_query.as_deref(),
            &mut headers,
            &body,
        );
    }
    let tampered = how % 4 == 3;
    if tampered {
        match body.first_mut() {
            Some(b) => *b ^= 1,
            None => raw_path.push('x'),
        }
    }
    let verdict = signers.credentials.authenticate(&SignedRequest {
        method: &method,
        raw_path: &raw_path,
        raw_query: raw_query.as_deref(),
        headers: &headers,
        body: &body,
    });
    if signed_by.is_some() && !tampered && has_host {
        assert_eq!(
            verdict.ok(),
            Some(AccountId(ACCOUNT.into())),
            "a signed request refused"
        );
    } else {
        assert!(verdict.is_err(), "an unsigned or changed request accepted");
    }
}

/// A function's ZIP as uploaded: the checks refuse it with an error or
/// pass it, and every file of a ZIP that passed comes out within the
/// size limit or gets an error.
pub fn function_zip(input: &[u8]) {
    if check_zip(input).is_err() {
        return;
    }
    let names: Vec<String> = zip::ZipArchive::new(Cursor::new(input))
        .map(|archive| {
            archive
                .file_names()
                .filter_map(|name| name.ok().map(|n| n.into_owned()))
                .collect()
        })
        .unwrap_or_default();
    for name in names {
        if let Ok(data) = extract(input, &name) {
            assert!(data.len() as u64 <= MAX_UNZIPPED_BYTES);
        }
    }
}

/// The start-up message as the guest's init decodes it: a message it
/// accepts encodes back to the same variables.
pub fn start_up_message(input: &[u8]) {
    if let Ok(variables) = environ::decode(input) {
        let encoded = environ::encode(variables.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .expect("what decodes encodes");
        assert_eq!(environ::decode(&encoded).as_ref(), Ok(&variables));
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    /// Keeps `input` as a seed of `target` when the fuzz script asks.
    fn seed(target: &str, name: &str, input: &[u8]) {
        if let Ok(dir) = std::env::var("MICROVM_FUZZ_SEED_DIR") {
            let dir = std::path::Path::new(&dir).join(target);
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(dir.join(name), input).unwrap();
        }
    }

    #[test]
    fn a_runtime_that_takes_the_event_and_answers_ends_the_invocation() {
        let input = format!(
            "GET /2018-06-01/runtime/invocation/next HTTP/1.1\r\nhost: localhost\r\n\r\n\
             POST /2018-06-01/runtime/invocation/{REQUEST_ID}/response HTTP/1.1\r\n\
             host: localhost\r\ncontent-length: 7\r\n\r\n\"hello\""
        );
        let exchange = serve_runtime_bytes(input.as_bytes());
        let answers = String::from_utf8(exchange.answers).unwrap();
        assert!(answers.starts_with("HTTP/1.1 200 OK"), "{answers}");
        assert!(answers.contains(REQUEST_ID), "{answers}");
        assert!(answers.contains("HTTP/1.1 202 Accepted"), "{answers}");
        assert_eq!(
            exchange.outcome,
            Some(Ok(Outcome::Response(Bytes::from_static(b"\"hello\""))))
        );
        seed(
            "runtime_api_request",
            "next-then-response",
            input.as_bytes(),
        );
    }

    #[test]
    fn a_runtime_error_and_an_init_error_reach_the_invoker() {
        let error = format!(
            "GET /2018-06-01/runtime/invocation/next HTTP/1.1\r\nhost: x\r\n\r\n\
             POST /2018-06-01/runtime/invocation/{REQUEST_ID}/error HTTP/1.1\r\nhost: x\r\n\
             lambda-runtime-function-error-type: Runtime.Bad\r\ncontent-length: 2\r\n\r\n{{}}"
        );
        let exchange = serve_runtime_bytes(error.as_bytes());
        assert_eq!(
            exchange.outcome,
            Some(Ok(Outcome::FunctionError {
                error_type: "Runtime.Bad".into(),
                body: Bytes::from_static(b"{}"),
            }))
        );
        seed("runtime_api_request", "next-then-error", error.as_bytes());
        let init = "POST /2018-06-01/runtime/init/error HTTP/1.1\r\nhost: x\r\n\
                    content-length: 4\r\n\r\noops";
        let exchange = serve_runtime_bytes(init.as_bytes());
        assert!(matches!(
            exchange.outcome,
            Some(Err(InvokeError::InitFailed { ref body, .. })) if body == "oops"
        ));
        seed("runtime_api_request", "init-error", init.as_bytes());
    }

    #[test]
    fn garbage_on_the_runtime_connection_gets_a_bad_request() {
        let exchange = serve_runtime_bytes(b"\x00\x01 not http\r\n\r\n");
        let answers = String::from_utf8_lossy(&exchange.answers).into_owned();
        assert!(answers.starts_with("HTTP/1.1 400"), "{answers}");
        assert!(exchange.outcome.is_none());
        runtime_api_requests(b"\x00\x01 not http\r\n\r\n");
    }

    #[test]
    fn an_http2_preface_gets_no_http2_answer() {
        // hyper's HTTP/1 server closes such a connection without a word.
        let preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\
                        GET /2018-06-01/runtime/invocation/next HTTP/1.1\r\n\r\n";
        let exchange = serve_runtime_bytes(preface);
        assert_eq!(String::from_utf8_lossy(&exchange.answers), "");
        assert!(exchange.outcome.is_none());
        runtime_api_requests(preface);
    }

    #[test]
    fn log_lines_are_cut_at_the_limit_however_the_reads_fall() {
        assert_eq!(
            expected_lines(
                b"short\r\nmuch too long a line\n\nEND RequestId: r1 \nlast",
                8
            ),
            ["short", "much too", "", "END Requ", "last"]
        );
        let mut input = vec![7, 2];
        input.extend_from_slice(b"hello\r\nEND RequestId: abc\nworld, this is long\n\xff\xfe");
        for read_size in [0, 1, 2, 5, 255] {
            input[1] = read_size;
            log_stream(&input);
        }
        // A limit that keeps the END marker whole.
        input[0] = 63;
        log_stream(&input);
        let log = Lines::log_stream();
        log.push("END RequestId: abc ".into());
        log.push("after".into());
        assert_eq!(log.ended().as_deref(), Some("abc"));
        assert_eq!(log.take_function_lines(), ["after"]);
        seed("log_stream", "lines-and-end", &input);
    }

    #[test]
    fn signed_requests_pass_and_forged_or_changed_ones_do_not() {
        let request = b"POST\n/2015-03-31/functions/f/invocations\nQualifier=1&a=b\n\
                        host: localhost:9000\ncontent-type: application/json\n\n{\"k\":1}";
        for how in 0..4u8 {
            let mut input = vec![how];
            input.extend_from_slice(request);
            signed_request(&input);
            seed("signed_request", &format!("mode-{how}"), &input);
        }
        // Without a host header even a signed request is refused.
        signed_request(b"\x01GET\n/\n\naccept: */*\n\n");
        let forged = b"\x00GET\n/\n\nhost: h\nx-amz-date: 20261206T000000Z\n\
                       authorization: AWS4-HMAC-SHA256 Credential=AKIDFUZZ/20261206/us-east-1/lambda/aws4_request, SignedHeaders=host;x-amz-date, Signature=00\n\n";
        signed_request(forged);
        seed("signed_request", "forged", forged);
    }

    #[test]
    fn the_start_up_message_decodes_to_what_was_encoded() {
        let message = environ::encode([("AWS_REGION", "us-east-1"), ("EMPTY", "")]).unwrap();
        start_up_message(&message);
        assert_eq!(environ::decode(&message).unwrap()[0].1, "us-east-1");
        seed("environ_message", "two-variables", &message);
    }

    #[test]
    fn a_function_zip_is_checked_and_its_files_come_out() {
        let mut zip = zip::ZipWriter::new(Cursor::new(Vec::new()));
        let options = zip::write::SimpleFileOptions::default();
        zip.start_file("bootstrap", options.unix_permissions(0o755))
            .unwrap();
        zip.write_all(b"#!/bin/sh\necho hello\n").unwrap();
        zip.start_file("lib/data.txt", options).unwrap();
        zip.write_all(&[b'a'; 4096]).unwrap();
        let zip = zip.finish().unwrap().into_inner();
        assert!(check_zip(&zip).is_ok());
        assert_eq!(
            extract(&zip, "bootstrap").unwrap(),
            b"#!/bin/sh\necho hello\n"
        );
        function_zip(&zip);
        seed("function_zip", "bootstrap-and-data", &zip);
    }
}
