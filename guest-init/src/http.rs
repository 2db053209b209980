//! Just enough HTTP/1.1 for the Runtime API: requests with a
//! `Content-Length` body, and responses parsed by `httparse`, over one
//! kept-alive connection. Sizes are bounded: a malformed or oversized
//! response is an error, never a crash.

use alloc::string::{String, ToString};
use alloc::vec::Vec;
use core::fmt;

/// The largest header section accepted.
pub const MAX_HEADER_BYTES: usize = 16 << 10;
/// The largest body accepted: Lambda's 6 MB payload limit.
pub const MAX_BODY_BYTES: usize = 6 * 1024 * 1024;
const MAX_HEADERS: usize = 64;

/// A byte stream the client talks over.
pub trait ByteStream {
    /// Reads some bytes; 0 means the peer closed.
    fn read(&mut self, buf: &mut [u8]) -> Result<usize, StreamError>;
    fn write_all(&mut self, data: &[u8]) -> Result<(), StreamError>;
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamError(pub String);

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HttpError {
    Stream(StreamError),
    /// The peer closed before a whole response arrived.
    Closed,
    Malformed(String),
    HeadersTooLarge,
    BodyTooLarge(usize),
}

impl fmt::Display for HttpError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HttpError::Stream(e) => write!(f, "stream error: {}", e.0),
            HttpError::Closed => f.write_str("connection closed mid-response"),
            HttpError::Malformed(why) => write!(f, "malformed response: {why}"),
            HttpError::HeadersTooLarge => {
                write!(f, "response headers exceed {MAX_HEADER_BYTES} bytes")
            }
            HttpError::BodyTooLarge(n) => {
                write!(f, "response body of {n} bytes exceeds {MAX_BODY_BYTES}")
            }
        }
    }
}

impl From<StreamError> for HttpError {
    fn from(e: StreamError) -> Self {
        HttpError::Stream(e)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    /// Names lower-cased.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// An HTTP/1.1 connection; bytes read past one response stay for the next.
pub struct Connection<S> {
    stream: S,
    buffer: Vec<u8>,
}

impl<S: ByteStream> Connection<S> {
    pub fn new(stream: S) -> Self {
        Connection {
            stream,
            buffer: Vec::new(),
        }
    }

    pub fn stream(&self) -> &S {
        &self.stream
    }

    /// Sends a request and reads its response.
    pub fn request(
        &mut self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> Result<Response, HttpError> {
        self.send(method, path, headers, body)?;
        self.read_response()
    }

    /// Sends a request; [`Connection::read_response`] reads its answer.
    pub fn send(
        &mut self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> Result<(), HttpError> {
        let mut head = String::new();
        head.push_str(method);
        head.push(' ');
        head.push_str(path);
        head.push_str(" HTTP/1.1\r\nHost: localhost\r\n");
        for (name, value) in headers {
            head.push_str(name);
            head.push_str(": ");
            head.push_str(value);
            head.push_str("\r\n");
        }
        head.push_str("Content-Length: ");
        head.push_str(&body.len().to_string());
        head.push_str("\r\n\r\n");
        self.stream.write_all(head.as_bytes())?;
        if !body.is_empty() {
            self.stream.write_all(body)?;
        }
        Ok(())
    }

    fn fill(&mut self) -> Result<(), HttpError> {
        let mut chunk = [0u8; 4096];
        let n = self.stream.read(&mut chunk)?;
        if n == 0 {
            return Err(HttpError::Closed);
        }
        self.buffer.extend_from_slice(&chunk[..n]);
        Ok(())
    }

    /// Reads the response to the oldest request not yet answered.
    pub fn read_response(&mut self) -> Result<Response, HttpError> {
        let (status, headers, header_len) = loop {
            let mut slots = [httparse::EMPTY_HEADER; MAX_HEADERS];
            let mut parsed = httparse::Response::new(&mut slots);
            match parsed.parse(&self.buffer) {
                Ok(httparse::Status::Complete(len)) => {
                    let status = parsed.code.unwrap_or(0);
                    let headers: Vec<(String, String)> = parsed
                        .headers
                        .iter()
                        .map(|h| {
                            (
                                h.name.to_ascii_lowercase(),
                                String::from_utf8_lossy(h.value).into_owned(),
                            )
                        })
                        .collect();
                    break (status, headers, len);
                }
                Ok(httparse::Status::Partial) => {
                    if self.buffer.len() > MAX_HEADER_BYTES {
                        return Err(HttpError::HeadersTooLarge);
                    }
                    self.fill()?;
                }
                Err(e) => return Err(HttpError::Malformed(e.to_string())),
            }
        };
        let length = match headers.iter().find(|(n, _)| n == "content-length") {
            Some((_, v)) => v
                .trim()
                .parse::<usize>()
                .map_err(|_| HttpError::Malformed("bad Content-Length".into()))?,
            None if headers.iter().any(|(n, _)| n == "transfer-encoding") => {
                return Err(HttpError::Malformed(
                    "chunked bodies are not supported".into(),
                ))
            }
            None => 0,
        };
        if length > MAX_BODY_BYTES {
            return Err(HttpError::BodyTooLarge(length));
        }
        while self.buffer.len() < header_len + length {
            self.fill()?;
        }
        let body = self.buffer[header_len..header_len + length].to_vec();
        self.buffer.drain(..header_len + length);
        Ok(Response {
            status,
            headers,
            body,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::collections::VecDeque;

    /// Replies with canned bytes, in the chunk sizes given; records writes.
    struct Canned {
        chunks: VecDeque<Vec<u8>>,
        written: Vec<u8>,
    }

    impl ByteStream for Canned {
        fn read(&mut self, buf: &mut [u8]) -> Result<usize, StreamError> {
            match self.chunks.pop_front() {
                Some(mut c) => {
                    let n = c.len().min(buf.len());
                    buf[..n].copy_from_slice(&c[..n]);
                    if n < c.len() {
                        self.chunks.push_front(c.split_off(n));
                    }
                    Ok(n)
                }
                None => Ok(0),
            }
        }
        fn write_all(&mut self, data: &[u8]) -> Result<(), StreamError> {
            self.written.extend_from_slice(data);
            Ok(())
        }
    }

    fn conn(chunks: &[&[u8]]) -> Connection<Canned> {
        Connection::new(Canned {
            chunks: chunks.iter().map(|c| c.to_vec()).collect(),
            written: Vec::new(),
        })
    }

    #[test]
    fn requests_carry_a_content_length_and_responses_split_across_reads() {
        let mut c = conn(&[
            b"HTTP/1.1 200 OK\r\nLambda-Runtime-Aws-Request-Id: ab",
            b"c\r\nContent-Length: 5\r\n\r\nhel",
            b"lo",
        ]);
        let r = c.request("POST", "/x", &[("A", "b")], b"{}").unwrap();
        assert_eq!(r.status, 200);
        assert_eq!(r.header("lambda-runtime-aws-request-id"), Some("abc"));
        assert_eq!(r.body, b"hello");
        let sent = String::from_utf8(c.stream.written.clone()).unwrap();
        assert!(sent.starts_with("POST /x HTTP/1.1\r\n"));
        assert!(sent.contains("A: b\r\n") && sent.ends_with("Content-Length: 2\r\n\r\n{}"));
    }

    #[test]
    fn two_responses_in_one_read_are_both_served() {
        let mut c = conn(&[b"HTTP/1.1 202 Accepted\r\nContent-Length: 0\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nx"]);
        assert_eq!(c.request("GET", "/", &[], b"").unwrap().status, 202);
        assert_eq!(c.request("GET", "/", &[], b"").unwrap().body, b"x");
    }

    #[test]
    fn bad_responses_are_errors() {
        let mut c = conn(&[b"NOT HTTP\r\n\r\n"]);
        assert!(matches!(
            c.request("GET", "/", &[], b""),
            Err(HttpError::Malformed(_))
        ));
        let mut c = conn(&[b"HTTP/1.1 200 OK\r\nContent-Length: 99999999999\r\n\r\n"]);
        assert!(matches!(
            c.request("GET", "/", &[], b""),
            Err(HttpError::BodyTooLarge(_))
        ));
        let mut c = conn(&[b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc"]);
        assert_eq!(c.request("GET", "/", &[], b""), Err(HttpError::Closed));
        let mut c = conn(&[b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"]);
        assert!(matches!(
            c.request("GET", "/", &[], b""),
            Err(HttpError::Malformed(_))
        ));
        let huge = [b'a'; MAX_HEADER_BYTES + 10];
        let mut c = conn(&[b"HTTP/1.1 200 OK\r\nX: ", &huge]);
        assert_eq!(
            c.request("GET", "/", &[], b""),
            Err(HttpError::HeadersTooLarge)
        );
    }
}
