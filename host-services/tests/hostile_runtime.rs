//! A runtime in the guest is untrusted: whatever bytes it writes to the
//! Runtime API's socket, the worker answers them (or closes the
//! connection) without hanging or failing, and an invocation served
//! properly afterwards still gets its answer.

use std::path::Path;
use std::time::Duration;

use axum::body::Bytes;
use host_services::data_plane::runtime_api::{Outcome, RuntimeApi};
use proptest::prelude::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

const NEXT: &str = "/2018-06-01/runtime/invocation/next";

/// Sends `request` on a new connection and reads the server's answer: a
/// whole response, or the connection closed. A request that is not whole
/// (a body shorter than its length, say) rightly gets no answer until the
/// client ends its side, which it then does: the server must then close.
/// `Err` says what went wrong.
async fn exchange(socket: &Path, request: &[u8]) -> Result<Vec<u8>, String> {
    let mut stream = UnixStream::connect(socket).await.expect("connect");
    // The server may close before reading everything; that is an answer.
    let _ = stream.write_all(request).await;
    let mut reply = Vec::new();
    let answered = tokio::time::timeout(Duration::from_millis(300), async {
        let mut chunk = [0u8; 4096];
        loop {
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => reply.extend_from_slice(&chunk[..n]),
            }
            if reply.windows(4).any(|w| w == b"\r\n\r\n") {
                return;
            }
        }
    })
    .await;
    match answered {
        Ok(()) if reply.is_empty() => Err("closed without an answer".into()),
        Ok(()) => Ok(reply),
        Err(_) => {
            let _ = stream.shutdown().await;
            tokio::time::timeout(Duration::from_secs(2), stream.read_to_end(&mut reply))
                .await
                .map_err(|_| "neither an answer nor a close within 2 s".to_string())?
                .map_err(|e| e.to_string())?;
            Ok(reply)
        }
    }
}

/// One request on its own connection, answered and closed by the server.
async fn request(socket: &Path, request: &[u8]) -> Option<Vec<u8>> {
    let mut stream = UnixStream::connect(socket).await.ok()?;
    stream.write_all(request).await.ok()?;
    let mut reply = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut reply))
        .await
        .ok()?
        .ok()?;
    Some(reply)
}

/// A well-behaved runtime: one `/next`, then the event echoed back.
async fn serve_one(socket: &Path) -> Option<String> {
    let reply = request(
        socket,
        format!("GET {NEXT} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").as_bytes(),
    )
    .await?;
    let text = String::from_utf8_lossy(&reply).into_owned();
    let id = text
        .lines()
        .find_map(|l| l.strip_prefix("lambda-runtime-aws-request-id: "))?
        .trim()
        .to_string();
    let body = text.split("\r\n\r\n").nth(1)?.to_string();
    let post = format!(
        "POST /2018-06-01/runtime/invocation/{id}/response HTTP/1.1\r\nhost: x\r\n\
         connection: close\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    request(socket, post.as_bytes()).await?;
    Some(id)
}

/// Requests shaped like the API's, with hostile parts: any method, paths
/// near the real ones, odd headers (the error type among them), bodies
/// that disagree with their length; and plain garbage.
fn hostile_request() -> impl Strategy<Value = Vec<u8>> {
    let method = prop::sample::select(vec!["POST", "PUT", "DELETE", "GET", "PATCH", "\0", ""]);
    let path = prop_oneof![
        Just("/2018-06-01/runtime/init/error".to_string()),
        "[A-Za-z0-9%._~-]{0,40}"
            .prop_map(|id| format!("/2018-06-01/runtime/invocation/{id}/response")),
        "[A-Za-z0-9%._~-]{0,40}"
            .prop_map(|id| format!("/2018-06-01/runtime/invocation/{id}/error")),
        "/[ -~]{0,60}",
    ];
    let headers = prop::collection::vec(
        (
            prop::sample::select(vec![
                "lambda-runtime-function-error-type",
                "content-length",
                "transfer-encoding",
                "expect",
                "x",
            ]),
            prop_oneof![
                "[ -~]{0,40}".prop_map(String::into_bytes),
                prop::collection::vec(any::<u8>(), 0..40),
            ],
        ),
        0..4,
    );
    let body = prop::collection::vec(any::<u8>(), 0..300);
    let shaped = (method, path, headers, body).prop_map(|(method, path, headers, body)| {
        // A GET of /next is the runtime asking for work, which waits for
        // an event: legitimate, and not what this test sends.
        let method = if method == "GET" && path == NEXT {
            "POST"
        } else {
            method
        };
        let mut request = format!(
            "{method} {path} HTTP/1.1\r\nhost: x\r\ncontent-length: {}\r\n",
            body.len()
        )
        .into_bytes();
        for (name, value) in headers {
            request.extend_from_slice(name.as_bytes());
            request.extend_from_slice(b": ");
            request.extend_from_slice(&value);
            request.extend_from_slice(b"\r\n");
        }
        request.extend_from_slice(b"\r\n");
        request.extend_from_slice(&body);
        request
    });
    prop_oneof![shaped, prop::collection::vec(any::<u8>(), 1..400)]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn hostile_requests_get_answers_and_a_proper_invocation_still_completes(
        requests in prop::collection::vec(hostile_request(), 1..8)
    ) {
        let runtime = tokio::runtime::Runtime::new().unwrap();
        runtime.block_on(async {
            let dir = std::env::temp_dir().join(format!("hostile-runtime-{}", std::process::id()));
            std::fs::create_dir_all(&dir).unwrap();
            let socket = dir.join(format!("{}.sock", uuid::Uuid::new_v4().simple()));
            let api = RuntimeApi::bind(&socket, None, "arn:aws:lambda:local:111111111111:function:f")
                .await
                .unwrap();
            for request in &requests {
                let reply = exchange(&socket, request).await;
                let shown = String::from_utf8_lossy(request);
                let reply = reply.map_err(|e| TestCaseError::fail(format!("{shown:?}: {e}")))?;
                prop_assert!(
                    reply.is_empty() || reply.starts_with(b"HTTP/1.1 "),
                    "{:?} got {:?}",
                    shown,
                    String::from_utf8_lossy(&reply)
                );
            }
            let runtime_side = {
                let socket = socket.clone();
                tokio::spawn(async move { serve_one(&socket).await })
            };
            let outcome = api
                .invoke("req-1", Bytes::from_static(b"{\"k\":1}"), Duration::from_secs(10))
                .await;
            let _ = std::fs::remove_file(&socket);
            // An init error a hostile request posted is the runtime's own
            // report, and ends the invocation as one: also an answer.
            match outcome {
                Ok(outcome) => {
                    prop_assert_eq!(outcome, Outcome::Response(Bytes::from_static(b"{\"k\":1}")));
                    let served = runtime_side.await.unwrap();
                    prop_assert_eq!(served.as_deref(), Some("req-1"));
                }
                Err(e) => prop_assert!(
                    e.to_string().starts_with("the runtime failed to initialize"),
                    "{e}"
                ),
            }
            Ok(())
        })?;
    }
}

/// SnapStart's hook point: a runtime initialized for a snapshot asks
/// `/restore/next`, which ends its init phase; the answer waits until the
/// environment resumes (its snapshot taken), then the runtime goes on.
#[tokio::test]
async fn restore_next_ends_the_init_phase_and_is_answered_once_the_environment_resumes() {
    let dir = std::env::temp_dir().join(format!("restore-next-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let socket = dir.join("api.sock");
    let api = RuntimeApi::bind(
        &socket,
        None,
        "arn:aws:lambda:local:111111111111:function:f",
    )
    .await
    .unwrap();
    let waiting = {
        let socket = socket.clone();
        tokio::spawn(async move {
            request(
                &socket,
                b"GET /2018-06-01/runtime/restore/next HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n",
            )
            .await
        })
    };
    tokio::time::timeout(Duration::from_secs(5), api.ready())
        .await
        .expect("restore/next ends the init phase")
        .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        !waiting.is_finished(),
        "answered before the environment resumed"
    );
    api.resume();
    let reply = waiting.await.unwrap().expect("an answer once resumed");
    assert!(
        reply.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&reply)
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
