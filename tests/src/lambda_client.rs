//! A small Lambda API client for load tests and benchmarks: hyper's
//! pooled HTTP/1.1 client, requests signed with SigV4 as the SDKs sign
//! them. The functional tests use boto3; this client exists because a
//! Python client cannot drive 32 concurrent invokes without its own
//! latency swamping the worker's.

use std::io::Write;
use std::time::{Duration, Instant};

use base64::Engine as _;
use bytes::Bytes;
use host_services::security::auth::{sign, AccessKey};
use http_body_util::{BodyExt, Full};
use hyper::header::HeaderValue;
use hyper::{HeaderMap, Method, Request};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

/// How [`LambdaClient::request`]'s error starts when no connection was
/// made.
pub const NOT_CONNECTED: &str = "cannot connect";

pub struct LambdaClient {
    http: Client<HttpConnector, Full<Bytes>>,
    address: String,
    key_id: String,
    secret: String,
}

#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub headers: HeaderMap,
    pub body: Bytes,
}

/// One answered invocation.
#[derive(Debug)]
pub struct Invoked {
    pub status: u16,
    pub body: Bytes,
    pub function_error: Option<String>,
    /// The decoded `X-Amz-Log-Result`.
    pub log_tail: String,
    pub latency: Duration,
}

impl Invoked {
    fn report_ms(&self, field: &str) -> Option<f64> {
        let rest = self.log_tail.split(field).nth(1)?;
        rest.split(' ').next()?.parse().ok()
    }

    /// The REPORT line's Init Duration: a cold start that booted.
    pub fn init_duration_ms(&self) -> Option<f64> {
        self.report_ms("Init Duration: ")
    }

    /// The REPORT line's Restore Duration: a cold start that restored the
    /// version's snapshot.
    pub fn restore_duration_ms(&self) -> Option<f64> {
        self.report_ms("Restore Duration: ")
    }

    /// Either: how long this invocation's environment took to start.
    pub fn cold_start_ms(&self) -> Option<f64> {
        self.init_duration_ms().or(self.restore_duration_ms())
    }
}

impl LambdaClient {
    /// A client of the worker at `address` (`host:port`) for one key.
    pub fn new(address: &str, key_id: &str, secret: &str) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        LambdaClient {
            http: Client::builder(TokioExecutor::new())
                .pool_max_idle_per_host(256)
                .build(connector),
            address: address.to_string(),
            key_id: key_id.to_string(),
            secret: secret.to_string(),
        }
    }

    /// Sends one signed request.
    pub async fn request(
        &self,
        method: Method,
        path: &str,
        query: Option<&str>,
        extra: &[(&'static str, &str)],
        body: Bytes,
    ) -> Result<Response, String> {
        let mut headers = HeaderMap::new();
        headers.insert(
            "host",
            HeaderValue::from_str(&self.address).map_err(|e| e.to_string())?,
        );
        for (name, value) in extra {
            headers.insert(
                *name,
                HeaderValue::from_str(value).map_err(|e| e.to_string())?,
            );
        }
        let key = AccessKey {
            id: &self.key_id,
            secret: &self.secret,
            region: "local",
        };
        sign(&key, &method, path, query, &mut headers, &body);
        let uri = match query {
            Some(q) => format!("http://{}{path}?{q}", self.address),
            None => format!("http://{}{path}", self.address),
        };
        let mut request = Request::builder()
            .method(method)
            .uri(uri)
            .body(Full::new(body))
            .map_err(|e| e.to_string())?;
        *request.headers_mut() = headers;
        // A request that never reached the worker says so: a caller may
        // send it again without running anything twice.
        let response = self.http.request(request).await.map_err(|e| {
            if e.is_connect() {
                format!("{NOT_CONNECTED}: {e}")
            } else {
                e.to_string()
            }
        })?;
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        Ok(Response {
            status,
            headers,
            body,
        })
    }

    /// Creates a `wasi-preview1` function whose code is `wasm`, zipped as
    /// `function.wasm`.
    pub async fn create_wasm_function(
        &self,
        name: &str,
        wasm: &[u8],
        timeout_s: u32,
    ) -> Result<(), String> {
        let request = serde_json::json!({
            "FunctionName": name,
            "Runtime": "wasi-preview1",
            "Role": "arn:aws:iam::111111111111:role/load",
            "Handler": "function.wasm",
            "Timeout": timeout_s,
            "Code": {"ZipFile": base64::engine::general_purpose::STANDARD.encode(zip_one("function.wasm", wasm))},
        });
        self.call(Method::POST, "/2015-03-31/functions", None, request, 201)
            .await
            .map(drop)
    }

    /// A signed JSON request that must answer `expect`; returns the body.
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        query: Option<&str>,
        body: serde_json::Value,
        expect: u16,
    ) -> Result<serde_json::Value, String> {
        let r = self
            .request(
                method.clone(),
                path,
                query,
                &[("content-type", "application/json")],
                body.to_string().into(),
            )
            .await?;
        if r.status != expect {
            let error_type = r
                .headers
                .get("x-amzn-errortype")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("");
            return Err(format!(
                "{method} {path}: {} {error_type} {}",
                r.status,
                String::from_utf8_lossy(&r.body)
            ));
        }
        if r.body.is_empty() {
            return Ok(serde_json::Value::Null);
        }
        serde_json::from_slice(&r.body).map_err(|e| format!("{method} {path}: {e}"))
    }

    /// PublishVersion; returns the new version.
    pub async fn publish_version(&self, function: &str) -> Result<String, String> {
        let path = format!("/2015-03-31/functions/{function}/versions");
        let v = self
            .call(Method::POST, &path, None, serde_json::json!({}), 201)
            .await?;
        v["Version"]
            .as_str()
            .map(str::to_string)
            .ok_or_else(|| format!("PublishVersion answered {v}"))
    }

    /// PutProvisionedConcurrencyConfig, GetProvisionedConcurrencyConfig
    /// (`n` None) or DeleteProvisionedConcurrencyConfig (`n` Some(0)).
    pub async fn provisioned_concurrency(
        &self,
        function: &str,
        qualifier: &str,
        n: Option<u32>,
    ) -> Result<serde_json::Value, String> {
        let path = format!("/2019-09-30/functions/{function}/provisioned-concurrency");
        let query = format!("Qualifier={qualifier}");
        let (method, body, expect) = match n {
            None => (Method::GET, serde_json::json!({}), 200),
            Some(0) => (Method::DELETE, serde_json::json!({}), 204),
            Some(n) => (
                Method::PUT,
                serde_json::json!({ "ProvisionedConcurrentExecutions": n }),
                202,
            ),
        };
        self.call(method, &path, Some(&query), body, expect).await
    }

    /// A RequestResponse invoke with the log tail.
    pub async fn invoke(&self, function: &str, payload: Bytes) -> Result<Invoked, String> {
        let started = Instant::now();
        let r = self
            .request(
                Method::POST,
                &format!("/2015-03-31/functions/{function}/invocations"),
                None,
                &[("x-amz-log-type", "Tail")],
                payload,
            )
            .await?;
        let latency = started.elapsed();
        let header = |name: &str| {
            r.headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        };
        let log_tail = header("x-amz-log-result")
            .and_then(|b| base64::engine::general_purpose::STANDARD.decode(b).ok())
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default();
        Ok(Invoked {
            status: r.status,
            function_error: header("x-amz-function-error"),
            body: r.body,
            log_tail,
            latency,
        })
    }
}

/// A zip archive holding one stored file.
pub fn zip_one(name: &str, data: &[u8]) -> Vec<u8> {
    let mut out = std::io::Cursor::new(Vec::new());
    let mut zip = zip::ZipWriter::new(&mut out);
    let options =
        zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    zip.start_file(name, options).expect("zip entry");
    zip.write_all(data).expect("zip data");
    zip.finish().expect("zip directory");
    out.into_inner()
}

/// A zip archive holding one executable file (mode 0755), as a
/// `bootstrap` must be.
pub fn zip_one_executable(name: &str, data: &[u8]) -> Vec<u8> {
    let mut out = std::io::Cursor::new(Vec::new());
    let mut zip = zip::ZipWriter::new(&mut out);
    let options = zip::write::SimpleFileOptions::default().unix_permissions(0o755);
    zip.start_file(name, options).expect("zip entry");
    zip.write_all(data).expect("zip data");
    zip.finish().expect("zip directory");
    out.into_inner()
}
